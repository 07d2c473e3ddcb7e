"""The `sweep` flow: methods x ratios on one model.

    load ─► calibration ─► evaluate_dense
                 └─► per method: capture ─► score ─┬─► prune(r1) ─► [recover] ─► evaluate
                                                   ├─► prune(r2) ─► ...
                                                   └─► prune(r3) ─► ...

Capture and scores depend on the model, the calibration set and the method's settings, not on the
ratio: they are computed once per method and reused by every ratio branch. The branches are
submitted to the flow's task runner: sequential (default), threads, or a Dask cluster through
`prefect-dask` (`--task-runner dask`; `PRUNEFLOW_DASK_ADDRESS` to use an existing cluster).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from prefect import flow

from pruning_core.errors import ConfigError
from tasks import cleanup, steps
from tasks.store import open_store, pruneflow_home

from .compress import (
    RECOVERIES,
    STEP_ORDER,
    StepLog,
    capture_args,
    ctx_for,
    eval_settings,
    place,
    prepare,
    recover_args,
    teacher_args,
    versions,
)
from .spec import RunSpec, validate

RUNNERS = ("sequential", "threads", "dask")


def check_sweep(spec: RunSpec, methods: list[str], ratios: list[float], cfg: dict | None = None) -> None:
    """Validate every (method, ratio) combination before anything runs (with the model's config `cfg`:
    also that each ratio is reachable for each method, `preflight.check_target`)."""
    from .preflight import check_target

    if not methods:
        raise ConfigError("--methods", methods, "at least one method")
    if not ratios:
        raise ConfigError("--ratios", ratios, "at least one ratio in [0, 1)")
    raw = spec.model_dump(mode="json")
    for m in methods:
        for r in ratios:
            sub = validate({**raw, "method": {"name": m, "settings": raw["method"]["settings"] if m == spec.method.name
                                              else {}}, "ratio": r, "schedule": None})
            if cfg is not None:
                check_target(sub, cfg)


def _settings_for(spec: RunSpec, method: str) -> dict:
    raw = spec.model_dump(mode="json")
    sub = {**raw, "method": {"name": method, "settings": raw["method"]["settings"] if method == spec.method.name else {}}}
    return validate(sub).method.settings


def _state_hit(state, man: dict) -> bool:
    return state.name == "Cached" or bool(man.get("hit"))


@flow(name="sweep", log_prints=False, validate_parameters=False,
      on_completion=[cleanup.flow_ended], on_failure=[cleanup.flow_ended], on_cancellation=[cleanup.flow_ended])
def sweep(spec: dict, methods: list[str], ratios: list[float]) -> dict:
    s = validate(spec)
    from .preflight import preflight

    # the same checks as the command line's (a deployment's run has not been through them), before any step
    check_sweep(s, methods, ratios, preflight(s)["config"])
    ctx = ctx_for(s)
    open_store(ctx["store"]).check()
    cleanup.begin_flow(ctx["store"])  # reclaim what killed runs left; journal this one
    counts = {k: {"miss": 0, "hit": 0} for k in STEP_ORDER}
    t0 = time.perf_counter()
    sl = StepLog(ctx)
    model, calib = prepare(s, sl)
    place(s, sl, model, [(m, _settings_for(s, m)) for m in methods], ratios)  # one placement for every branch
    for k in ("load", "calibration"):
        counts[k][sl.cache[k]] += 1
    ev = eval_settings(s)
    dense_f = steps.evaluate_task.submit(ctx=ctx, target=model, settings=ev, model_revision=model["sha256"],
                                         label="dense", dtype=model["dtype"])
    branches = []
    from pruning_core.methods import get_method

    for method in methods:
        settings = _settings_for(s, method)
        meth = get_method(method)
        scores_f = None
        if not meth.coupled:
            stats_f = steps.capture_task.submit(ctx=ctx, model=model, calib=calib, **capture_args(meth, settings, ratios),
                                                batch_size=s.calibration.batch_size)
            scores_f = steps.score_task.submit(ctx=ctx, model=model, stats=stats_f, method=method, settings=settings)
            branches.append(("capture", None, None, stats_f))
            branches.append(("score", None, None, scores_f))
        extra = {}
        if settings.get("schedule") == "search":  # one tables artifact for every ratio of the sweep
            extra["tables"] = steps.layer_tables_task.submit(ctx=ctx, model=model, calib=calib, method=method,
                                                             settings=settings)
            branches.append(("layer_tables", None, None, extra["tables"]))
        for r in ratios:
            ck = steps.prune_task.submit(ctx=ctx, model=model, method=method, settings=settings, ratio=r,
                                         scores=scores_f, calib=calib if meth.coupled else None, **extra)
            branches.append(("prune", method, r, ck))
            if s.recovery.kind in RECOVERIES:
                def submit(step, task, _m=method, _r=r, **kw):  # per branch; the teacher's key is the same
                    fut = task.submit(ctx=ctx, **kw)
                    branches.append((step, _m, _r, fut))
                    return fut

                ck = steps.recover_task.submit(ctx=ctx, checkpoint=ck, **recover_args(s, model, calib, settings),
                                               **teacher_args(s, submit, model, calib))
                branches.append(("recover", method, r, ck))
            evf = steps.evaluate_task.submit(ctx=ctx, target=ck, settings=ev, model_revision=model["sha256"],
                                             label="pruned", dtype=model["dtype"])
            branches.append(("evaluate", method, r, evf))
            branches.append(("_ckpt", method, r, ck))
    dense = dense_f.result()
    counts["evaluate_dense"]["hit" if _state_hit(dense_f.state, dense) else "miss"] += 1
    rows: dict[tuple, dict] = {}
    for kind, method, r, fut in branches:
        man = fut.result()
        if kind == "_ckpt":
            rows.setdefault((method, r), {})["ckpt"] = man
            continue
        counts[kind]["hit" if _state_hit(fut.state, man) else "miss"] += 1
        if kind == "evaluate":
            rows.setdefault((method, r), {})["eval"] = man
    out_rows = []
    for (method, r), d in rows.items():
        ck, evm = d["ckpt"], d["eval"]
        pb, pa = dense["metrics"]["ppl"], evm["metrics"]["ppl"]
        out_rows.append({"method": method, "ratio": r, "params_before": ck.get("params_before"),
                         "params_after": ck.get("params_after"), "removed_fraction": ck.get("removed_fraction"),
                         "ppl_before": pb, "ppl_after": pa, "ppl_retention": pa / pb if pb else None,
                         "checkpoint": ck["uri"], "metrics_after": evm["metrics"]})
    result = {"model": s.model.ref, "methods": methods, "ratios": ratios, "rows": out_rows,
              "step_counts": {k: v for k, v in counts.items() if v["miss"] or v["hit"]},
              "metrics_before": dense["metrics"], "seconds": round(time.perf_counter() - t0, 3),
              "store": ctx["store"], "placement": sl.placement, "versions": versions()}
    # one folder per (spec, methods, ratios): sweeps that differ in any setting never share it
    tag = hashlib.sha256(json.dumps([s.digest(), methods, ratios]).encode()).hexdigest()[:8]
    run_dir = pruneflow_home() / "runs" / f"sweep-{Path(s.model.ref).name}-{'-'.join(methods)}-{tag}"
    man = steps.report_task(ctx=ctx, report=result, run_dir=str(run_dir))
    result["report"] = str(run_dir / "report.json")
    result["report_uri"] = man["uri"]
    if s.tracking.enabled:  # MLflow: one "sweep" run with the points and the PPL/accuracy-vs-ratio plot
        from tasks.tracking import track_sweep

        result["tracking"] = track_sweep(s.model_dump(mode="json"), result, str(run_dir))
    return result


def _runner(name: str):
    if name == "sequential":
        return None
    if name == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=2)
    if name == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as e:
            raise ConfigError("--task-runner", name, "sequential or threads (prefect-dask is not installed)") from e
        addr = os.environ.get("PRUNEFLOW_DASK_ADDRESS")
        if addr:
            return DaskTaskRunner(address=addr)
        return DaskTaskRunner(cluster_kwargs={"n_workers": int(os.environ.get("PRUNEFLOW_DASK_WORKERS", "2")),
                                              "threads_per_worker": 1, "dashboard_address": None,
                                              "processes": os.environ.get("PRUNEFLOW_DASK_PROCESSES", "1") != "0"})
    raise ConfigError("--task-runner", name, ", ".join(RUNNERS))


def run_sweep(spec: dict, methods: list[str], ratios: list[float], task_runner: str = "sequential") -> dict:
    runner = _runner(task_runner)
    if runner is None:
        from prefect.task_runners import ThreadPoolTaskRunner

        runner = ThreadPoolTaskRunner(max_workers=1)  # one at a time, in submission order
    return sweep.with_options(task_runner=runner)(spec=spec, methods=methods, ratios=ratios)
