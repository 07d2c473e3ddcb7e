"""`pruneflow plan`: parameters and FLOPs per token before / after, per layer, without touching weights.

The model is built from its config on the `meta` device (no weights read or allocated). The kept
sizes of every layer depend only on the ratio, schedule and GQA rule, not on the scores, so the
method's own selection is run on random scores; coupled methods give their kept sizes through
`Method.sizes` (SlimGPT's solved schedule, FLAP's uniform structure); the others fall back to the same
uniform rule `select.plan_from_scores` applies, marked as an estimate.

Disk: what the run writes, per place — spills of modified layers under `disk` placement
($PRUNEFLOW_SCRATCH, else $TMPDIR), the checkpoint staged in $TMPDIR, the checkpoints and statistics
the store keeps (an S3 store: its local download cache) — against the free space of each filesystem;
a one-line ConfigError when one cannot hold its share.

Servability: the format `export` will write (stock, vLLM's DeciLM, or pruneflow's vLLM plugin), whether
stock vLLM can serve it (one query-head count for every layer), and with `servable: vllm` the layers
whose sizes the constraint changes against the same method without it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pruning_core import hfload
from pruning_core.errors import ConfigError

from .spec import RunSpec


def config_only(cfg: dict):
    """A transformers config from a config.json's content alone (no folder, weights or hub)."""
    from transformers import AutoConfig

    cfg = dict(cfg)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def _meta_model(ref: str, trust_remote_code: bool = False, revision: str | None = None, cfg: dict | None = None):
    """`ref`'s model on the meta device, from its config (`cfg`: a config.json's content instead of the ref's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from pruning_core.models import resolve_model_path

    if cfg is not None:
        config = config_only(cfg)
    elif ref.startswith("s3://"):  # from its config.json alone: no weight is downloaded for a dry run
        from pruning_core.models import s3_config

        cfg = s3_config(ref)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    else:
        config = AutoConfig.from_pretrained(resolve_model_path(ref, revision), trust_remote_code=trust_remote_code)
    if getattr(config, "pruneflow_layers", None):
        raise ConfigError("model.ref", ref, "a uniform model for the dry run (this checkpoint has per-layer sizes)")
    with torch.device("meta"):
        model = hfload.from_config(AutoModelForCausalLM, config, trust_remote_code=trust_remote_code)
    return model


def _cached_tables(spec: RunSpec, settings) -> dict | None:
    """The `layer_tables` artifact a run of this spec would reuse, when the store already holds it (a
    previous run or sweep with the same model, calibration and table settings); None otherwise."""
    try:
        from tasks import steps  # noqa: F401 - defines the steps
        from tasks.common import STEPS
        from tasks.store import default_store_url, open_store

        # as flows.compress.ctx_for (not imported: compress imports this module's callers)
        ctx = {"store": spec.store.url or default_store_url(), "device": spec.device, "placement": spec.model.placement}
        store = open_store(ctx.get("store"))
        m, c = spec.model, spec.calibration
        model = store.lookup("load", STEPS["load"].key({"ctx": ctx, "ref": m.ref, "dtype": m.dtype,
                                                        "revision": m.revision}))
        if not model:
            return None
        calib = store.lookup("calibration", STEPS["calibration"].key(
            {"ctx": ctx, "model": model, "source": c.source, "n_samples": c.n_samples, "seq_len": c.seq_len,
             "seed": c.seed}))
        if not calib:
            return None
        tp = {"ctx": ctx, "model": model, "calib": calib, "method": spec.method.name,
              "settings": settings.model_dump(mode="json")}
        man = store.lookup("layer_tables", STEPS["layer_tables"].key(tp))
        if not man or not store.valid(man):
            return None
        from safetensors.torch import load_file

        return load_file(str(store.local_path(man)))
    except Exception:  # noqa: BLE001 - a plan never fails on the cache: it falls back to the estimate
        return None


def search_plan(spec: RunSpec, model, adapter, meth, settings):
    """`schedule: search` in a dry run: the searched widths over the cached tables when the store has them,
    else an estimate (the budget solved over placeholder tables whose cost grows with each layer's removed
    fraction, the same for every layer — it checks the budget is feasible under the constraints and gives the
    sizes' scale; the real widths need the calibration pass). Returns (plan, basis, info)."""
    from pruning_core import search
    from pruning_core.select import sizes_plan, unit_counts

    gqa = getattr(settings, "gqa", "kv_group")
    tables = _cached_tables(spec, settings)
    found = tables is not None
    if not found:
        tables = {}
        for i, u in enumerate(unit_counts(model, adapter, gqa)):
            if u:
                s = adapter.layer_shape(model, adapter.layers(model)[i])
                n_units = search._n_units(s, gqa)
                tables[f"attn.{i}"] = (torch.arange(n_units + 1, dtype=torch.float64) / n_units) ** 2 * 0.5
                tables[f"ffn.{i}"] = (torch.arange(s.ffn + 1, dtype=torch.float64) / s.ffn) ** 2
    targets = tuple(t for t in getattr(settings, "targets", ("heads", "ffn")) if t in ("heads", "ffn"))
    sched = search.solve(model, adapter, tables, spec.ratio, gqa, settings.search, settings.budget, settings.servable,
                         targets)
    plan = sizes_plan(model, adapter, sched, gqa, meth.name, settings.model_dump(), spec.ratio)
    basis = ("schedule: search over the cached layer_tables (the widths a run with this calibration will use)" if found
             else "schedule: search, ESTIMATE — the widths are found at run time from the layer_tables step "
                  "(one calibration pass + one-layer KL checks); shown: the budget solved over placeholder costs")
    info = {"tables": "cached" if found else "estimate", "memory_bytes": sched["memory_bytes"],
            "memory_at": sched["memory_at"], "params_after": sched["params_after"], "realised_ratio": sched["realised"],
            "budget": settings.budget.model_dump() if settings.budget else None}
    return plan, basis, info


def _plan(model, adapter, meth, settings, ratio: float):
    """(plan, basis): the method's kept sizes without calibration data."""
    from pruning_core.plan import PrunePlan
    from pruning_core.select import layer_ratios, plan_from_scores

    g = torch.Generator().manual_seed(0)
    scores = {}
    shapes = adapter.shapes(model)
    for i, s in enumerate(shapes):
        scores[f"heads.{i}"] = torch.rand(s.n_heads, generator=g)
        scores[f"ffn.{i}"] = torch.rand(s.ffn, generator=g)
    plan: PrunePlan | None = None
    basis = "the method's selection on random scores (kept sizes do not depend on the scores)"
    if meth.select is not None and "layers" not in meth.targets:
        try:
            plan = meth.select(model, adapter, scores, ratio, settings)
        except (RuntimeError, NotImplementedError, KeyError, ValueError, TypeError):
            plan = None
    elif meth.sizes is not None:
        plan = meth.sizes(model, adapter, ratio, settings)
        basis = "the method's own schedule (kept sizes; which units go depends on the data)"
    if plan is None:
        basis = "estimate: uniform removal of round(n x ratio) units per layer"
        sd = settings.model_dump()
        if "layers" in meth.targets:
            n = len(shapes)
            k = int(n * ratio + 0.5)
            plan = PrunePlan.identity(n, meth.name, sd)
            for lp in plan.layers[max(0, n - 1 - k):n - 1]:
                lp.keep = False
            basis = f"estimate: a block of {k} consecutive layers removed"
        else:
            per_layer = layer_ratios(sd.get("schedule", "uniform"), ratio, len(shapes)) \
                if isinstance(sd.get("schedule", "uniform"), str) else None
            plan = plan_from_scores(model, adapter, scores, ratio,
                                    targets=tuple(t for t in meth.targets if t in ("heads", "ffn")),
                                    gqa=sd.get("gqa", "kv_group"), per_layer=per_layer, method=meth.name, settings=sd,
                                    uniform_heads=sd.get("servable") == "vllm")
    return plan, basis


def servable_check(rows: list[dict], model_type: str | None = "llama") -> dict:
    """Whether stock vLLM can serve these sizes (`vllm`: one query-head count for every kept layer, the
    DeciLM format's rule) and the format `export` will write (`format`): stock (every kept layer the same
    shape), decilm, or plugin (pruneflow's vLLM plugin, `pip install pruneflow[serve]`)."""
    kept = [r for r in rows if r.get("heads_after") or r.get("ffn_after")]
    heads = [(r["layer"], r["heads_after"]) for r in kept if r.get("heads_after")]
    first = heads[0] if heads else None
    bad = next(((i, h) for i, h in heads if h != first[1]), None)
    uniform = len({(r["heads_after"], r["kv_heads_after"], r["ffn_after"]) for r in kept}) <= 1
    if bad is None:
        fmt = "stock" if uniform else ("decilm" if model_type == "llama" else "plugin")
        return {"vllm": True, "query_heads": first[1] if first else None, "format": fmt}
    return {"vllm": False, "format": "plugin",
            "reason": f"layer {bad[0]} keeps {bad[1]} query heads, layer {first[0]} keeps {first[1]}; "
                      "set servable: vllm"}


def dry_run(spec: RunSpec, context: int = 0, cfg: dict | None = None) -> dict:
    """`cfg`: plan from this config.json content alone (a recipe's model: no weights, tokenizer or hub)."""
    from pruning_core.adapters import adapter_for
    from pruning_core.methods import get_method
    from pruning_core.metrics import flops_per_token, layer_table

    model = _meta_model(spec.model.ref, spec.model.trust_remote_code, spec.model.revision, cfg)
    adapter = adapter_for(model)
    meth = get_method(spec.method.name)
    settings = meth.parse_settings(spec.method.settings)
    searched = None
    if getattr(settings, "schedule", None) == "search":
        plan, basis, searched = search_plan(spec, model, adapter, meth, settings)
    else:
        plan, basis = _plan(model, adapter, meth, settings, spec.ratio)
    constraint = None
    if settings.servable == "vllm" and searched is None:  # what the constraint changes, against the same method without it
        free, _ = _plan(model, adapter, meth, settings.model_copy(update={"servable": "none"}), spec.ratio)
        free_rows = {r["layer"]: r for r in layer_table(model, free, context=context)}
        constraint = {"unconstrained_params_after": free.params_after, "changed": []}
    rows = layer_table(model, plan, context=context)
    if constraint is not None:
        for r in rows:
            f = free_rows[r["layer"]]
            if (f["heads_after"], f["kv_heads_after"], f["ffn_after"]) != (r["heads_after"], r["kv_heads_after"],
                                                                           r["ffn_after"]):
                constraint["changed"].append({"layer": r["layer"], "heads": [f["heads_after"], r["heads_after"]],
                                              "kv_heads": [f["kv_heads_after"], r["kv_heads_after"]],
                                              "ffn": [f["ffn_after"], r["ffn_after"]]})
    # embeddings / lm_head / final norm are untouched by structured pruning of the decoder layers
    other_params = sum(p.numel() for p in model.parameters()) - sum(r["params"] for r in rows)
    other_flops = flops_per_token(model, context=context) - sum(r["flops"] for r in rows)
    total = {
        "params": other_params + sum(r["params"] for r in rows),
        "params_after": other_params + sum(r["params_after"] for r in rows),
        "flops": other_flops + sum(r["flops"] for r in rows),
        "flops_after": other_flops + sum(r["flops_after"] for r in rows),
    }
    span = meth.cosine_span(model, adapter, [spec.ratio], settings) if meth.cosine_span is not None else None
    memory = memory_plan(spec, model.config, meth, cosine_span=span)
    disk = disk_plan(spec, model.config, meth, memory["placement"], plan.params_after)
    return {"disk": disk, "model": spec.model.ref, "method": meth.name, "ratio": spec.ratio, "context": context, "basis": basis,
            "layers": rows, "total": total, "plan_params": [plan.params_before, plan.params_after],
            **distill_plan(spec, model.config),
            "servable": {**servable_check(rows, getattr(model.config, "model_type", None)),
                         "constraint": settings.servable, "changes": constraint}, **memory,
            **({"search": searched} if searched else {})}


def distill_plan(spec: RunSpec, config) -> dict:
    """`recovery: distill`: the teacher artifact's size on disk (tokens x k x (index + value bytes))."""
    if spec.recovery.kind != "distill":
        return {}
    from pruning_core.distill import teacher_bytes

    from .spec import distill_data

    d, r = distill_data(spec), spec.recovery.settings
    k = min(r["top_k"] or config.vocab_size, config.vocab_size)
    tokens = (d["n_samples"] + r.get("mix_samples", 0)) * d["seq_len"]
    return {"teacher": {"tokens": tokens, "top_k": k, "source": d["source"], "train": r["train"],
                        "bytes": teacher_bytes(tokens, k, 2 if r["teacher_dtype"] == "float16" else 4)}}


def memory_plan(spec: RunSpec, config, meth, free: tuple[int, int] | None = None,
                cosine_span: int | None = None, dtype: str | None = None, check: bool = True) -> dict:
    """{"placement", "placement_reason", "working_set", "memory": {step: {device, host}}, "free_memory"}; a
    one-line ConfigError (`check`) when a step cannot fit the free memory under the chosen placement.
    `auto` is resolved with the largest working set of the steps (`estimate_steps`), against the free
    memory (host memory within the cgroup's limit: `memory.free_memory`). `dtype`: the run's (the load
    step's); default the spec's."""
    from pruning_core.loading import resolve_dtype as dtype_for
    from pruning_core.memory import check_fits, choose_placement, estimate_steps, free_memory, param_bytes
    from pruning_core.models import resolve_device

    dev = resolve_device(spec.device)
    dt = dtype_for(dtype or spec.model.dtype, config, dev)
    free = free or free_memory(dev)
    c, e = spec.calibration, spec.evaluation

    def est(pl):
        return estimate_steps(config, dt, pl, dev, meth, c.n_samples, c.seq_len, c.batch_size, e.ppl_seq_len,
                              e.batch_size, cosine_span=cosine_span)

    sizes = param_bytes(config, dt)
    work = max(v["device"] or v["host"] for v in est("device").values()) - sizes["total"]
    placement, why = choose_placement(spec.model.placement, sizes, work, dev, free)
    steps = est(placement)
    if check:
        check_fits(steps, free, placement, cuda=dev.type == "cuda")
    return {"placement": placement, "placement_reason": why, "dtype": str(dt).removeprefix("torch."),
            "weights": sizes["total"], "working_set": work, "memory": steps, "free_memory": {"device": free[0], "host": free[1]}}


def _free_bytes(path: Path) -> tuple[int, int]:
    """(filesystem id, free bytes) of the filesystem that holds `path` (or would: its nearest existing folder)."""
    import os
    import shutil

    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return os.stat(p).st_dev, shutil.disk_usage(p).free


def disk_plan(spec: RunSpec, config, meth, placement: str, params_after: int) -> dict:
    """{"places": {spill|scratch|store: {"path", "bytes"}}, "free": {path: bytes}}: the disk a run of
    `spec` writes (an upper bound: a fully cached rerun writes nothing); a one-line ConfigError when
    a filesystem cannot hold what goes to it."""
    import os
    import tempfile

    from pruning_core.loading import resolve_dtype
    from pruning_core.memory import param_bytes, stats_bytes
    from pruning_core.models import resolve_device
    from tasks.store import default_store_url, open_store

    dt = resolve_dtype(spec.model.dtype, config, resolve_device(spec.device))
    sizes = param_bytes(config, dt)
    el = torch.tensor([], dtype=dt).element_size()
    ckpt = int(params_after) * el
    n_ckpt = 1 + (spec.recovery.kind != "none") + (spec.export.format != "none")
    modifies = bool(meth.coupled) or spec.recovery.kind != "none"  # layers written back while on disk
    url = spec.store.url or default_store_url()
    store = open_store(url)
    store_path = Path(store.cache if store.remote else store.root)  # S3: its local download cache
    tmp = Path(tempfile.gettempdir())
    places = {
        "spill": {"path": Path(os.environ.get("PRUNEFLOW_SCRATCH") or tmp),
                  "bytes": sizes["layers"] if placement == "disk" and modifies else 0},
        "scratch": {"path": tmp, "bytes": ckpt},
        "store": {"path": store_path, "bytes": n_ckpt * ckpt + (0 if meth.coupled else stats_bytes(config, meth))},
    }
    fs = {k: _free_bytes(v["path"]) for k, v in places.items()}
    if not store.remote and fs["scratch"][0] == fs["store"][0]:
        places["scratch"]["bytes"] = 0  # the staged checkpoint becomes the store's object by a rename
    gib = 2**30
    for dev, free in {d: f for d, f in fs.values()}.items():
        on = [k for k in ("store", "spill", "scratch") if fs[k][0] == dev]
        need = sum(places[k]["bytes"] for k in on)
        if need > free:
            first = on[0]
            field = {"store": "store.url", "spill": "PRUNEFLOW_SCRATCH" if os.environ.get("PRUNEFLOW_SCRATCH")
                     else "TMPDIR", "scratch": "TMPDIR"}[first]
            parts = " + ".join(f"{k} {places[k]['bytes'] / gib:.1f}" for k in on)
            raise ConfigError(field, str(places[first]["path"]),
                              f"a disk with room for the run: it writes ~{need / gib:.1f} GiB there ({parts} GiB), "
                              f"{free / gib:.1f} GiB are free (point PRUNEFLOW_SCRATCH, TMPDIR or store.url "
                              "at a larger disk)")
    return {"places": {k: {"path": str(v["path"]), "bytes": v["bytes"]} for k, v in places.items()},
            "free": {str(places[k]["path"]): fs[k][1] for k in places}}
