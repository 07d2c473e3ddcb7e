"""The `compress` flow: one model, one method, one ratio (or schedule) -> pruned checkpoint + report.

    load ──► calibration ──► capture ──► score ──► prune ──► recover ──► evaluate ──► report (+ MLflow)
                  │                                  ▲                       ▲
                  └──── (coupled methods: SlimGPT) ──┘     evaluate_dense ───┘ (once per model + eval settings)

Each arrow is a cached Prefect task (see `tasks/`); a second run of the same spec is all cache hits.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from prefect import flow

from pruning_core.errors import PruneflowError
from pruning_core.evaluate import retention
from pruning_core.util import git_revision
from tasks import cleanup, steps
from tasks.cachekey import format_reason
from tasks.store import default_store_url, open_store, pruneflow_home

from .console import BARS
from .console import enabled as console_enabled
from .spec import RunSpec, validate

log = logging.getLogger("pruneflow.flow")

STEP_ORDER = ("load", "calibration", "capture", "score", "layer_tables", "prune", "distill_data", "distill_samples",
              "distill_mix", "teacher", "recover",
              "evaluate_dense", "evaluate_unrecovered", "evaluate", "export")


def _host_memory() -> dict:
    """{"peak_rss": this process's peak RSS so far, "rss": its RSS now} in bytes (Linux / macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    try:
        import psutil

        now = psutil.Process().memory_info().rss
    except (ImportError, OSError):
        now = None
    return {"peak_rss": peak, "rss": now}


class StepLog:
    """Calls tasks in order, recording per-step wall time and cache hit / miss / skipped."""

    def __init__(self, ctx: dict, on_step=None):
        self.ctx, self.timings, self.cache, self.artifacts = ctx, {}, {}, {}
        self.why: dict[str, str] = {}  # step -> why it missed (which part of its cache key is new)
        self.memory: dict[str, dict] = {}  # step -> host memory of this process after it (bytes)
        self.placement: dict | None = None  # the run's placement and why (`place`)
        self.unrecovered: dict | None = None  # the pruned model's evaluation before its recovery, if asked for
        self.on_step = on_step

    def __call__(self, name: str, task, **kw) -> dict:
        with BARS.step(name) as done:  # the console's bar for this step (flows/console.py)
            man, state, dt = self._run(task, **kw)
            hit = state.name == "Cached" or bool(man.get("hit"))
            done("cached" if hit else "")
        self.timings[name] = round(dt, 3)
        self.cache[name] = "hit" if hit else "miss"
        if not hit and man.get("why"):
            self.why[name] = format_reason(man["why"])
        if man.get("uri"):
            self.artifacts[name] = man["uri"]
        self.memory[name] = _host_memory()
        if self.on_step:
            self.on_step(name, self.cache[name], dt)
        return man

    def _run(self, task, **kw):
        t0 = time.perf_counter()
        state = task(ctx=self.ctx, **kw, return_state=True)
        man = state.result()  # raises the task's exception on failure
        return man, state, time.perf_counter() - t0

    def skip(self, name: str) -> None:
        self.timings[name] = 0.0
        self.cache[name] = "skipped"


def ctx_for(spec: RunSpec) -> dict:
    return {"store": spec.store.url or default_store_url(), "device": spec.device, "placement": spec.model.placement}


def eval_settings(spec: RunSpec) -> dict:
    e = spec.evaluation
    return {"source": e.source, "ppl_seq_len": e.ppl_seq_len, "ppl_windows": e.ppl_windows, "tasks": list(e.tasks),
            "limit": e.limit, "efficiency": e.efficiency, "batch_size": e.batch_size}


def prepare(spec: RunSpec, sl: StepLog) -> tuple[dict, dict]:
    """load + calibration: shared by compress and sweep."""
    m = spec.model
    model = sl("load", steps.load_model_task, ref=m.ref, dtype=m.dtype, revision=m.revision,
               trust_remote_code=m.trust_remote_code)
    c = spec.calibration
    calib = sl("calibration", steps.calibration_task, model=model, source=c.source, n_samples=c.n_samples,
               seq_len=c.seq_len, seed=c.seed)
    return model, calib


def place(spec: RunSpec, sl: StepLog, model: dict, methods: list[tuple[str, dict]] | None = None,
          ratios: list[float] | None = None) -> dict:
    """The run's placement, chosen once after load (flows/placement.py); every later step, the dense
    and the pruned evaluation included, runs under it (it goes to them in `ctx`)."""
    from .placement import run_placement

    sl.placement = run_placement(spec, model, methods, ratios)
    sl.ctx["placement"] = sl.placement["placement"]
    return sl.placement


def capture_args(meth, settings: dict, ratios: list[float]) -> dict:
    """What capture collects for `meth`: the cheap norm vectors always (so methods that differ only
    there share one capture), plus whatever the method asks for (Gram matrices, cosines); a cosine
    method's capture keeps only the span it compares at `ratios`."""
    args = {"requests": sorted(set(meth.needs) | {"norms"})}
    if meth.cosine_span is not None:
        args["cosine_span"] = {"method": meth.name, "settings": settings, "ratios": sorted(ratios)}
    return args


def score_once(spec: RunSpec, sl: StepLog, model: dict, calib: dict, method: str, settings: dict,
               ratios: list[float]) -> dict | None:
    """capture + score (skipped for coupled methods, which consume the calibration set in prune)."""
    from pruning_core.methods import get_method

    meth = get_method(method)
    if meth.coupled:
        sl.skip("capture")
        sl.skip("score")
        return None
    stats = sl("capture", steps.capture_task, model=model, calib=calib, **capture_args(meth, settings, ratios),
               batch_size=spec.calibration.batch_size)
    return sl("score", steps.score_task, model=model, stats=stats, method=method, settings=settings)


def prune_and_evaluate(spec: RunSpec, sl: StepLog, model: dict, calib: dict, scores: dict | None, method: str,
                       settings: dict, ratio: float) -> tuple[dict, dict]:
    from pruning_core.methods import get_method

    coupled = get_method(method).coupled
    extra = {}
    if settings.get("schedule") == "search":  # the per-layer tables: one cached artifact for every ratio / budget
        extra["tables"] = sl("layer_tables", steps.layer_tables_task, model=model, calib=calib, method=method,
                             settings=settings)
    ckpt = sl("prune", steps.prune_task, model=model, method=method, settings=settings, ratio=ratio,
              scores=scores, calib=calib if coupled else None, **extra)
    if spec.recovery.kind in RECOVERIES:
        pruned = ckpt
        ckpt = sl("recover", steps.recover_task, **recover_args(spec, model, calib, settings),
                  **teacher_args(spec, sl, model, calib), checkpoint=ckpt)
        if spec.evaluation.before_recovery:  # the same evaluation of the checkpoint the recovery started from
            sl.unrecovered = sl("evaluate_unrecovered", steps.evaluate_task, target=pruned, settings=eval_settings(spec),
                                model_revision=model["sha256"], label="pruned, before recovery", dtype=model["dtype"])
    else:  # none: the prune step's checkpoint as it is (an LLM-Streamline replacement stays untrained)
        sl.skip("recover")
    after = sl("evaluate", steps.evaluate_task, target=ckpt, settings=eval_settings(spec),
               model_revision=model["sha256"], label="pruned",
               dtype=model["dtype"])
    return ckpt, after


RECOVERIES = ("lora", "replacement", "distill")  # the kinds that run the recover step


def teacher_args(spec: RunSpec, run, model: dict, calib: dict) -> dict:
    """For `distill`: the distillation blocks (the calibration's unless recovery.settings name others)
    and the teacher over them, each through `run(step, task, **kw)` (a cached step: computed once per
    model, text and k, whatever the method and ratio); {} for the other kinds."""
    if spec.recovery.kind != "distill":
        return {}
    from pruning_core.distill import TEACHER_SAMPLES

    from .spec import distill_data

    d, c = distill_data(spec), spec.calibration
    same = d == {"source": c.source, "n_samples": c.n_samples, "seq_len": c.seq_len, "seed": c.seed}
    r = spec.recovery.settings
    if d["source"] == TEACHER_SAMPLES:  # text the dense model writes (a cached step of its own)
        blocks = run("distill_data", steps.teacher_samples_task, model=model, n_samples=d["n_samples"],
                     seq_len=d["seq_len"], seed=d["seed"], temperature=r["sample_temperature"],
                     batch_size=r["sample_batch_size"])
    else:
        blocks = calib if same else run("distill_data", steps.calibration_task, model=model, **d)
    if r["mix_samples"]:  # the model's own text beside the training text's blocks (two cached steps)
        extra = run("distill_samples", steps.teacher_samples_task, model=model, n_samples=r["mix_samples"],
                    seq_len=d["seq_len"], seed=d["seed"], temperature=r["sample_temperature"],
                    batch_size=r["sample_batch_size"])
        blocks = run("distill_mix", steps.concat_blocks_task, parts=[blocks, extra])
    teacher = run("teacher", steps.teacher_task, model=model, blocks=blocks, top_k=r["top_k"],
                  dtype=r["teacher_dtype"], batch_size=r["teacher_batch_size"])
    return {"teacher": teacher, "blocks": blocks}


def recover_args(spec: RunSpec, model: dict, calib: dict, method_settings: dict) -> dict:
    """The recover step's inputs: LoRA takes `recovery.settings` and the training text; the
    replacement (LLM-Streamline) takes the method's settings, the calibration blocks and the dense model."""
    r = spec.recovery
    args = {"kind": r.kind, "model_revision": model["sha256"], "train_source": spec.calibration.source,
            "seq_len": spec.calibration.seq_len, "calib": calib, "dtype": model["dtype"]}
    if r.kind == "replacement":
        return {**args, "settings": method_settings, "model": model}
    if r.kind == "distill" and method_settings.get("replacement") in ("layer", "ffn") \
            and method_settings.get("steps", 1) > 0:  # LLM-Streamline: the replacement is trained first
        return {**args, "settings": r.settings, "model": model, "replacement_settings": method_settings}
    return {**args, "settings": r.settings}


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "transformers", "prefect", "mlflow", "lm_eval", "peft", "pruneflow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    rev = git_revision()
    if rev:
        out["code_revision"] = rev
    return out


def _metrics_view(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("params",)}


def plan_view(store_url: str, ckpt: dict) -> dict:
    """What the report shows of the plan: per layer kept/removed, kept head / KV head / FFN counts,
    the replacement, the realised fraction of its parameters removed; the unpruned sizes; the notes."""
    from pruning_core.plan import PrunePlan

    try:
        folder = open_store(store_url).local_path(ckpt)
        plan = PrunePlan.load(Path(folder) / "plan.json")
        cfg = json.loads((Path(folder) / "plan.json").parent.joinpath("config.json").read_text())
    except (OSError, ValueError, PruneflowError) as e:
        log.warning("plan.json of the checkpoint not readable for the report: %s", e)
        return {}
    ratios = plan.per_layer_ratio or []
    layers = []
    for i, lp in enumerate(plan.layers):
        layers.append({"index": lp.index, "keep": lp.keep,
                       "heads": None if lp.heads is None else len(lp.heads),
                       "kv_heads": None if lp.kv_heads is None else len(lp.kv_heads),
                       "ffn": None if lp.ffn is None else len(lp.ffn),
                       "replacement": (lp.replacement or {}).get("kind"),
                       "ratio": ratios[i] if i < len(ratios) else (0.0 if lp.keep else 1.0)})
    full = {"heads": cfg.get("num_attention_heads"), "kv_heads": cfg.get("num_key_value_heads")
            or cfg.get("num_attention_heads"), "ffn": cfg.get("intermediate_size") or cfg.get("ffn_dim")}
    notes = {k: v for k, v in (plan.notes or {}).items() if k != "training"}
    return {"layers": layers, "full_sizes": {k: v for k, v in full.items() if v}, "plan_notes": notes}


def _stability(store_url: str, dense: dict, after: dict) -> float | None:
    """LLM-Streamline's stability over the lm-eval items both evaluations answered (None without lm-eval)."""
    if not (dense.get("samples") and after.get("samples")):
        return None
    from pruning_core.evaluate import stability

    store = open_store(store_url)
    try:
        d = json.loads(Path(store.local_path(dense["samples"])).read_text())
        a = json.loads(Path(store.local_path(after["samples"])).read_text())
        return stability(d, a)
    except (OSError, ValueError, PruneflowError) as e:
        log.warning("stability not computed: %s", e)
        return None


def build_report(spec: RunSpec, sl: StepLog, ckpt: dict, dense: dict, after: dict, run_dir: str) -> dict:
    mb, ma = _metrics_view(dense["metrics"]), _metrics_view(after["metrics"])
    rec = ckpt.get("recovery") if isinstance(ckpt.get("recovery"), dict) else None
    extra = {
        "decoder_params_before": ckpt.get("decoder_params_before"),
        "removed_decoder_fraction": ckpt.get("removed_decoder_fraction"),
        "rounding": ckpt.get("rounding"),
        "uniform": ckpt.get("uniform"),
        "protocols": {**dense.get("protocols", {}), **after.get("protocols", {})},
        "eval_placement": {"dense": dense.get("placement"), "pruned": after.get("placement")},
        "stability": _stability(sl.ctx["store"], dense, after),
        "recovery_info": ({**{("module" if k == "kind" else k): v for k, v in rec.items() if k != "lr_curve"},
                           "kind": spec.recovery.kind} if rec else None),
        "metrics_before_recovery": _metrics_view(sl.unrecovered["metrics"]) if sl.unrecovered else None,
        **plan_view(sl.ctx["store"], ckpt),
    }
    return {
        "name": spec.run_name(),
        "id": Path(run_dir).name,  # the run folder (`pruneflow report <id>`; a name resolves to its latest id)
        "model": spec.model.ref,
        "method": spec.method.name,
        "settings": spec.method.settings,
        "target_ratio": spec.ratio,
        "schedule": spec.schedule,
        "recovery": spec.recovery.kind,
        "params_before": ckpt.get("params_before"),
        "params_after": ckpt.get("params_after"),
        "removed_fraction": ckpt.get("removed_fraction"),
        "metrics_before": mb,
        "metrics_after": ma,
        "retention": retention(mb, ma),  # after/before, perplexities inverted; 1.0 = as good as dense
        "timings": {k: sl.timings.get(k) for k in STEP_ORDER if k in sl.timings},
        "cache": {k: sl.cache.get(k) for k in STEP_ORDER if k in sl.cache},
        "host_memory": {k: sl.memory[k] for k in STEP_ORDER if k in sl.memory},  # peak RSS so far after each step
        "placement": sl.placement,  # chosen once for the run: dense and pruned evaluated under the same one
        "cache_why": {k: sl.why[k] for k in STEP_ORDER if k in sl.why},
        "artifacts": {**sl.artifacts, "checkpoint": ckpt["uri"], "run_dir": run_dir,
                      "log": str(Path(run_dir) / "pruneflow.log")},
        "store": sl.ctx["store"],
        "versions": versions(),
        "spec": spec.model_dump(mode="json"),
        **{k: v for k, v in extra.items() if v is not None},
    }


def run_dir_for(spec: RunSpec) -> Path:
    return pruneflow_home() / "runs" / spec.run_id()


class _RunLog:
    """Every log record of this run (pruneflow, Prefect, libraries, Python warnings) into
    `<run_dir>/pruneflow.log`. On the command line's console (flows/console.py) only pruneflow's
    warnings are shown, one line each; the rest stays in the file."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "pruneflow.log"
        self.handler: logging.Handler | None = None
        self.console: logging.Handler | None = None

    def __enter__(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handler = logging.FileHandler(self.path, mode="a")
        except OSError:
            return self
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handler.setLevel(logging.INFO)
        logging.getLogger().addHandler(self.handler)  # the root: every logger that propagates
        logging.getLogger("prefect.extra").addHandler(self.handler)  # Prefect's non-propagating one
        self._warnings = logging.captureWarnings(True)
        pf = logging.getLogger("pruneflow")
        self._saved = (pf.level, pf.propagate)
        quiet = os.environ.get("PRUNEFLOW_QUIET") in ("1", "true")
        pf.setLevel(logging.WARNING if quiet else logging.INFO)  # --quiet: warnings only
        if console_enabled():
            from .console import WarningLine

            self.console = WarningLine()
            pf.addHandler(self.console)
        return self

    def __exit__(self, *exc):
        if self.handler is not None:
            logging.getLogger().removeHandler(self.handler)
            logging.getLogger("prefect.extra").removeHandler(self.handler)
            logging.captureWarnings(False)
            pf = logging.getLogger("pruneflow")
            pf.setLevel(self._saved[0])
            if self.console is not None:
                pf.removeHandler(self.console)
            self.handler.close()


def _link_checkpoint(run_dir: Path, ckpt: dict, store_url: str, name: str = "checkpoint") -> str:
    """`<run_dir>/<name>` -> the checkpoint object (local store); the URI for a remote store."""
    if "://" in store_url and not store_url.startswith("file://"):
        return ckpt["uri"]
    link = run_dir / name
    try:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(ckpt["uri"], target_is_directory=True)
        return str(link)
    except OSError:
        return ckpt["uri"]


def track(spec: RunSpec, report: dict, run_dir: str) -> dict | None:
    if not spec.tracking.enabled:
        return None
    from tasks import tracking

    try:
        return tracking.track_compress_run(spec.model_dump(mode="json"), report, run_dir)
    except PruneflowError:
        raise
    except Exception as e:  # noqa: BLE001 - tracking must not lose a finished compression
        if spec.tracking.on_failure == "fail":
            raise
        log.warning("MLflow tracking failed (%s: %s); the run's results are in %s", type(e).__name__, e, run_dir)
        return {"error": f"{type(e).__name__}: {e}"}


@flow(name="compress", log_prints=False, validate_parameters=False,  # lm-eval/dill print bytecode otherwise
      on_completion=[cleanup.flow_ended], on_failure=[cleanup.flow_ended], on_cancellation=[cleanup.flow_ended])
def compress(spec: dict, run_dir: str | None = None) -> dict:
    """Compress one model with one method at one ratio; returns the run report (also report.json)."""
    BARS.settle()  # the command line's "prefect" bar: the flow run has started
    s = validate(spec)
    from .preflight import preflight

    preflight(s)  # the same checks as the command line's (a deployment's run has not been through them)
    ctx = ctx_for(s)
    open_store(ctx["store"]).check()
    cleanup.begin_flow(ctx["store"])  # reclaim what killed runs left; journal this one
    rd = Path(run_dir) if run_dir else run_dir_for(s)
    rd.mkdir(parents=True, exist_ok=True)
    with _RunLog(rd):
        sl = StepLog(ctx, on_step=lambda n, c, dt: log.info("step %-14s %-7s %7.2f s", n, c, dt))
        model, calib = prepare(s, sl)
        place(s, sl, model)
        scores = score_once(s, sl, model, calib, s.method.name, s.method.settings, [s.ratio])
        ckpt, after = prune_and_evaluate(s, sl, model, calib, scores, s.method.name, s.method.settings, s.ratio)
        dense = sl("evaluate_dense", steps.evaluate_task, target=model, settings=eval_settings(s),
                   model_revision=model["sha256"], label="dense",
                   dtype=model["dtype"])
        report = build_report(s, sl, ckpt, dense, after, str(rd))
        report["artifacts"]["checkpoint_local"] = _link_checkpoint(rd, ckpt, ctx["store"])
        if s.export.format != "none":  # a folder vLLM serves as is (`vllm serve <run_dir>/servable-vllm`)
            served = sl("export", steps.export_task, checkpoint=ckpt, fmt=s.export.format,
                        model_revision=model["sha256"])
            report["timings"]["export"], report["cache"]["export"] = sl.timings["export"], sl.cache["export"]
            report["artifacts"]["servable"] = served["uri"]
            report["artifacts"]["servable_local"] = _link_checkpoint(rd, served, ctx["store"],
                                                                     f"servable-{s.export.format}")
            report["servable"] = {"format": s.export.format, "layout": served.get("layout")}
        with BARS.step("report"):
            rman = steps.report_task(ctx=ctx, report=report, run_dir=str(rd))
        report["artifacts"]["report"] = rman["uri"]
        if s.tracking.enabled:
            with BARS.step("mlflow") as done:
                tr = track(s, report, str(rd))
                done("" if not tr or tr.get("status", "ok") == "ok" else "failed")
        else:
            tr = None
        if tr is not None:
            report["tracking"] = tr
            tmp = rd / ".report.json.tmp"
            tmp.write_text(json.dumps(report, indent=1, default=str))
            os.replace(tmp, rd / "report.json")
    return report
