"""One Prefect task per pipeline step (design.md): load, calibration, capture, score, prune, recover,
evaluate, report. Each is thin: resolve its input manifests, call `pruning_core`, write its artifact
to the store, return a small manifest `{uri, sha256, bytes, kind, producer, ...}`.

Every task takes `ctx` (store URL, device, quiet) first; `ctx` is never part of a cache key.
Steps that run the model carry the `gpu` tag, so a concurrency limit on that tag serialises them
per worker. Retries only on network / storage errors (`retry_condition`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from prefect import task

from pruning_core.errors import ConfigError, DataError, StorageError

from .common import (
    cache_key_fn_for,
    clear_models,
    console_is_terminal,
    console_stream,
    define_step,
    load_model_cached,
    progress_enabled,
    progress_lines,
    retry_condition,
    run_step,
)
from .journal import scratch_dir
from .store import fault_point, open_store

log = logging.getLogger("pruneflow.tasks")

RETRIES = 2


def _task(step: str, gpu: bool = False):
    def deco(fn):
        return task(
            fn,
            name=step,
            cache_key_fn=cache_key_fn_for(step),
            persist_result=True,
            result_serializer="json",
            tags={"gpu"} if gpu else set(),
            retries=RETRIES,
            retry_delay_seconds=2,
            retry_condition_fn=retry_condition,
        )

    return deco


def _device(ctx: dict):
    from pruning_core.models import resolve_device

    return resolve_device(ctx.get("device", "auto"))


def _model_path(model: dict) -> str:
    return model["uri"]


def _placement(ctx: dict, path: str, dtype: str, trust_remote_code: bool = False, working_set: int = 0,
               step: str = "") -> str:
    """`model.placement` for this step: the run's, which the flow chose once (`flows/placement.py`) and
    passes in `ctx`. A task called on its own with `auto` resolves it here against free memory (logged
    with the reason)."""
    from transformers import AutoConfig

    from pruning_core.loading import resolve_dtype
    from pruning_core.memory import choose_placement, param_bytes

    req = ctx.get("placement", "auto")
    if req != "auto":
        return req
    dev = _device(ctx)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    placement, why = choose_placement("auto", param_bytes(config, resolve_dtype(dtype, config, dev)), working_set, dev)
    log.info("step %s: placement %s (%s)", step, placement, why)
    return placement


def _open(model: dict, ctx: dict, step: str, path: str | None = None, fresh: bool = False):
    """(model, tokenizer) of `path` (default: the dense model) under the run's placement; shared by
    the steps of one process unless `fresh` (a step that modifies it: prune)."""
    path = path or _model_path(model)
    trc = model.get("trust_remote_code", False)
    if fresh:
        from pruning_core.loading import open_model

        clear_models()  # never two models in memory: the prune step starts from the stored checkpoint
        placement = _placement(ctx, path, model["dtype"], trc, step=step)
        return open_model(path, placement=placement, device=_device(ctx), dtype=model["dtype"], trust_remote_code=trc)
    placement = _placement(ctx, path, model["dtype"], trc, step=step)
    return load_model_cached(path, model["dtype"], str(_device(ctx)), trc, placement=placement)


def _save_tensors(tensors: dict, name: str, kind: str, producer: str, ctx: dict, meta: dict | None = None) -> dict:
    from safetensors.torch import save_file

    store = open_store(ctx.get("store"))
    with scratch_dir() as d:
        p = Path(d) / name
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(p),
                  metadata={k: str(v) for k, v in (meta or {}).items()})
        return store.put_file(p, kind, producer)


def _load_tensors(man: dict, ctx: dict) -> dict:
    from safetensors.torch import load_file

    return load_file(str(open_store(ctx.get("store")).local_path(man)))


def _progress(desc: str, total: int, unit: str = "layer"):
    """A transient tqdm bar under the step's own bar and its callback `cb(done, total, *extra)`
    (a float extra, e.g. a training loss, is shown beside it). Crash tests can hold the step after
    unit `done` with PRUNEFLOW_FAULT=progress:<desc>:<done> (`store.fault_point`)."""
    bar, cb = _progress_bar(desc, total, unit)

    def cb_or_fault(done, *rest):
        cb(done, *rest)
        fault_point(f"progress:{desc}:{done}")

    return bar, cb_or_fault


def _progress_bar(desc: str, total: int, unit: str):
    if not progress_enabled():
        return None, lambda *a: None
    if not console_is_terminal():  # a log file: a line per training milestone, no redraws
        return None, progress_lines(desc, unit)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=f"  {desc}", unit=unit, leave=False, dynamic_ncols=True, file=console_stream())

    def cb(done, total_=None, *extra):
        if total_ and bar.total != total_:
            bar.total = total_
        bar.n = done
        if extra and isinstance(extra[0], float):
            bar.set_postfix_str(f"loss {extra[0]:.4g}", refresh=False)
        bar.refresh()

    return bar, cb


# ================================================================================================
# load: resolve / convert the model, fingerprint it (the "model revision" of every later key)
# ================================================================================================
def _load_keyparts(p):
    # A local folder keys on the content of every file in it (`model_revision`; unchanged files are not
    # read again), an s3:// folder on its objects' ETags (one LIST), a hub id on the commit its revision
    # resolves to; dtype auto on the device kind it resolves for. The embedded model's folder is
    # converted by this step: its fingerprint is checked when the record is reused (`model_valid`).
    from pruning_core.models import EMBEDDED, is_hub_id

    ref = p["ref"]
    parts = {"ref": ref if (is_hub_id(ref) or ref.startswith("s3://")) else _abs(ref), "dtype": p["dtype"],
             "revision": p.get("revision")}
    if is_hub_id(ref):
        from pruning_core.models import hub_snapshot

        parts["resolved"] = hub_snapshot(ref, p.get("revision"))[1]
    elif ref.startswith("s3://"):
        from pruning_core.models import s3_listing

        parts["resolved"] = s3_listing(ref)[3]
    elif ref not in EMBEDDED:
        from pruning_core.models import model_revision

        parts["content"] = model_revision(parts["ref"])
    if p["dtype"] == "auto":
        parts["device_kind"] = _device(p.get("ctx") or {}).type
    return parts, [], None


def _abs(ref: str) -> str:
    from pruning_core.models import EMBEDDED

    return ref if ref in EMBEDDED else str(Path(os.path.expanduser(ref)).resolve())


define_step("load", _load_keyparts, lambda p: [_load_keyparts, load_model_task], libraries=("gguf",))


@_task("load")
def load_model_task(ctx: dict, ref: str, dtype: str = "auto", revision: str | None = None,
                    trust_remote_code: bool = False) -> dict:
    params = {"ctx": ctx, "ref": ref, "dtype": dtype, "revision": revision}

    def compute():
        import hashlib

        from transformers import AutoConfig

        from pruning_core.loading import resolve_dtype
        from pruning_core.models import model_revision, resolve_source

        path, resolved = resolve_source(ref, revision)  # converts the embedded GGUF once; hub / s3 snapshots
        fp = model_revision(path)
        cfg = json.loads((Path(path) / "config.json").read_text())
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        dt = str(resolve_dtype(dtype, config, _device(ctx))).removeprefix("torch.")
        rev = resolved or revision or fp
        # every later key follows the model revision and the dtype it is computed in
        sha = hashlib.sha256(f"{rev}:{dt}".encode()).hexdigest()[:16]
        return {"uri": path, "sha256": sha, "revision": rev, "fingerprint": fp, "bytes": _dir_bytes(path),
                "kind": "model", "producer": "load", "external": True, "ref": ref, "dtype": dt,
                "architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0],
                "trust_remote_code": trust_remote_code}

    return run_step("load", params, compute)


def _decoder_params(model, adapter) -> int:
    return sum(p.numel() for layer in adapter.layers(model) for p in layer.parameters())


def _dir_bytes(path: str) -> int:
    p = Path(path)
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else 0


# ================================================================================================
# calibration: N x L token blocks from a text source
# ================================================================================================
def _source_fp(source: str) -> str:
    """The text source by its content (`pruning_core.data.source_digest`), not its name or mtime."""
    from pruning_core.data import source_digest

    return source_digest(source)


def _calib_keyparts(p):
    s = {k: p[k] for k in ("source", "n_samples", "seq_len", "seed")}
    s["source_fp"] = _source_fp(p["source"])
    return s, [p["model"]], p["model"]["sha256"]


define_step("calibration", _calib_keyparts, lambda p: [_calib_keyparts, calibration_task])


@_task("calibration")
def calibration_task(ctx: dict, model: dict, source: str, n_samples: int, seq_len: int, seed: int) -> dict:
    """The calibration blocks (defaults live in one place: `flows.spec.CalibrationSpec` / DEFAULT_SPEC)."""
    params = {"ctx": ctx, "model": model, "source": source, "n_samples": n_samples, "seq_len": seq_len, "seed": seed}

    def compute():
        from pruning_core.data import calibration_set
        from pruning_core.loading import _load_tokenizer

        tok = _load_tokenizer(Path(_model_path(model)), model.get("trust_remote_code", False))
        if tok is None:
            raise ConfigError("model.ref", model["ref"], "a model folder with a tokenizer")
        ids = calibration_set(tok, source, n_samples=n_samples, seq_len=seq_len, seed=seed)
        return _save_tensors({"input_ids": ids}, "calibration.safetensors", "calibration", "calibration", ctx)

    return run_step("calibration", params, compute)


def load_calibration(man: dict, ctx: dict):
    return _load_tensors(man, ctx)["input_ids"]


# ================================================================================================
# capture: layer-wise streamed statistics (Gram matrices, norms, cosines)
# ================================================================================================
def _capture_keyparts(p):
    settings = {"requests": sorted(p["requests"]), "batch_size": p["batch_size"]}
    if p.get("cosine_span"):  # what a cosine method compares at its ratios (see capture_task)
        settings["cosine_span"] = p["cosine_span"]
    return settings, [p["model"], p["calib"]], p["model"]["sha256"]


def _capture_code(p) -> list:
    roots: list = [_capture_keyparts, capture_task]
    if p.get("cosine_span"):  # the method's span function decides which hidden states are kept
        from pruning_core.methods import get_method

        roots.append(get_method(p["cosine_span"]["method"]).cosine_span)
    return roots


define_step("capture", _capture_keyparts, _capture_code)


@_task("capture", gpu=True)
def capture_task(ctx: dict, model: dict, calib: dict, requests: list[str], batch_size: int = 8,
                 cosine_span: dict | None = None) -> dict:
    """Layer-streamed statistics. `cosine_span` {"method", "settings", "ratios"}: the hidden states kept
    for cosines are only the method's span at those ratios (`Method.cosine_span`), not every layer's."""
    params = {"ctx": ctx, "model": model, "calib": calib, "requests": requests, "batch_size": batch_size,
              "cosine_span": cosine_span}

    def compute():
        from pruning_core.adapters import adapter_for
        from pruning_core.capture import capture_stats

        m, _tok = _open(model, ctx, "capture")
        adapter = adapter_for(m)
        span = None
        if cosine_span:
            from pruning_core.methods import get_method

            meth = get_method(cosine_span["method"])
            span = meth.cosine_span(m, adapter, cosine_span["ratios"], meth.parse_settings(cosine_span["settings"]))
        ids = load_calibration(calib, ctx)
        bar, cb = _progress("capture", len(adapter.layers(m)))
        try:
            stats = capture_stats(m, adapter, ids, requests=set(requests), device=_device(ctx),
                                  batch_size=batch_size, cosine_span=span, progress=cb)
        finally:
            if bar is not None:
                bar.close()
        return _save_tensors(stats, "stats.safetensors", "stats", "capture", ctx)

    return run_step("capture", params, compute)


# ================================================================================================
# score: the method's scores (ratio-free: one scoring serves every ratio)
# ================================================================================================
def _score_module(name: str) -> str:
    from pruning_core.methods import get_method

    m = get_method(name)
    fn = m.score or m.prune
    return getattr(fn, "__module__", "pruning_core.methods")


def _score_keyparts(p):
    return {"method": p["method"], "settings": p["settings"]}, [p["model"], p["stats"]], p["model"]["sha256"]


define_step("score", _score_keyparts, lambda p: [_score_module(p["method"]), _score_keyparts, score_task])


@_task("score", gpu=True)
def score_task(ctx: dict, model: dict, stats: dict | None, method: str, settings: dict) -> dict:
    params = {"ctx": ctx, "model": model, "stats": stats, "method": method, "settings": settings}

    def compute():
        from pruning_core.adapters import adapter_for
        from pruning_core.methods import get_method

        meth = get_method(method)
        m, _tok = _open(model, ctx, "score")
        st = _load_tensors(stats, ctx) if stats else {}
        scores = meth.score(m, adapter_for(m), st, meth.parse_settings(settings))
        return _save_tensors(scores, "scores.safetensors", "scores", f"score:{method}", ctx)

    return run_step("score", params, compute)


# ================================================================================================
# prune: plan (from scores, or the coupled method on the calibration set) + surgery + save
# ================================================================================================
def _prune_keyparts(p):
    s = {"method": p["method"], "settings": p["settings"], "ratio": p["ratio"]}
    tables = [p["tables"]] if p.get("tables") else []  # `schedule: search`: the per-layer tables it solved over
    return s, [p["model"], p.get("scores"), p.get("calib")] + tables, p["model"]["sha256"]


define_step("prune", _prune_keyparts, lambda p: [_score_module(p["method"]), _prune_keyparts, prune_task])


# ================================================================================================
# layer_tables: `schedule: search`'s per-layer cost of every head count and FFN width (one artifact per
# model + calibration + the settings the tables depend on; every ratio and budget reuses it)
# ================================================================================================
TABLE_SETTINGS = ("gqa", "percdamp", "compensate", "head_score", "batch_size")
TABLE_SEARCH = ("sensitivity", "kl_blocks", "ffn_batch")


def _tables_keyparts(p):
    st = p["settings"]
    s = {"method": p["method"], **{k: st.get(k) for k in TABLE_SETTINGS},
         "search": {k: (st.get("search") or {}).get(k) for k in TABLE_SEARCH}}
    return s, [p["model"], p["calib"]], p["model"]["sha256"]


define_step("layer_tables", _tables_keyparts, lambda p: ["pruning_core.search_tables", _tables_keyparts, layer_tables_task])


@_task("layer_tables", gpu=True)
def layer_tables_task(ctx: dict, model: dict, calib: dict, method: str, settings: dict) -> dict:
    params = {"ctx": ctx, "model": model, "calib": calib, "method": method, "settings": settings}

    def compute():
        from pruning_core.adapters import adapter_for
        from pruning_core.methods import get_method
        from pruning_core.search_tables import build_tables

        st = get_method(method).parse_settings(settings)
        m, _tok = _open(model, ctx, "layer_tables")
        adapter = adapter_for(m)
        bar, cb = _progress("layer tables", len(adapter.layers(m)))
        try:
            # OBS-compensated curves for SlimGPT (its weight update), zeroing curves for the others
            t = build_tables(m, adapter, load_calibration(calib, ctx), st.gqa, getattr(st, "percdamp", 0.01),
                             getattr(st, "compensate", False), getattr(st, "head_score", "grouped"), st.search,
                             device=_device(ctx), batch_size=getattr(st, "batch_size", 8), progress=cb)
        finally:
            if bar is not None:
                bar.close()
        return _save_tensors(t, "layer_tables.safetensors", "layer_tables", f"layer_tables:{method}", ctx,
                             meta={"seconds": float(t["seconds"][0])})

    return run_step("layer_tables", params, compute)


@_task("prune", gpu=True)
def prune_task(ctx: dict, model: dict, method: str, settings: dict, ratio: float, scores: dict | None = None,
               calib: dict | None = None, tables: dict | None = None) -> dict:
    params = {"ctx": ctx, "model": model, "method": method, "settings": settings, "ratio": ratio,
              "scores": scores, "calib": calib, "tables": tables}

    def compute():
        from pruning_core.adapters import adapter_for
        from pruning_core.checkpoint import save_streaming
        from pruning_core.methods import get_method
        from pruning_core.metrics import plan_params
        from pruning_core.surgery import count_params

        meth = get_method(method)
        st = meth.parse_settings(settings)
        # the stored dense checkpoint under the run's placement (no copy of a cached model)
        m, tok = _open(model, ctx, "prune", fresh=True)
        adapter = adapter_for(m)
        if meth.coupled:
            if calib is None:
                raise ConfigError("method.name", method, "a coupled method run with a calibration set")
            ids = load_calibration(calib, ctx)
            bar, cb = _progress(method, len(adapter.layers(m)))
            try:
                kw = {"tables": _load_tensors(tables, ctx)} if tables else {}
                plan = meth.prune(m, adapter, ids, ratio, st, device=_device(ctx), progress=cb, **kw)
            finally:
                if bar is not None:
                    bar.close()
        elif tables:  # schedule: search (score-then-select): the searched counts, the method's scores
            from pruning_core.search import select_searched

            plan = select_searched(m, adapter, _load_tensors(scores, ctx), ratio, st, method, _load_tensors(tables, ctx))
        else:
            sc = _load_tensors(scores, ctx)
            plan = meth.select(m, adapter, sc, ratio, st)
        dec_before = _decoder_params(m, adapter)
        before, after = plan_params(m, plan)
        plan.params_before, plan.params_after = before, after
        store = open_store(ctx.get("store"))
        with scratch_dir() as d:
            path = save_streaming(m, tok, plan, Path(d) / "checkpoint")  # layer by layer, shard by shard
            after = count_params(m)
            from pruning_core.checkpoint import is_uniform

            uniform = bool(is_uniform(path))
            man = store.put_dir(path, "checkpoint", f"prune:{method}", move=True)  # a rename on a local store
        del m
        return {**man, "params_before": before, "params_after": after, "target_ratio": ratio,
                "removed_fraction": 1 - after / before if before else 0.0,
                # `ratio` is a fraction of decoder-layer parameters: the realised figure, and how depth
                # methods rounded it
                "decoder_params_before": dec_before,
                "removed_decoder_fraction": (before - after) / dec_before if dec_before else 0.0,
                "rounding": (plan.notes or {}).get("rounding"), "uniform": uniform,
                **({"search": plan.notes["search"]} if "search" in (plan.notes or {}) else {})}

    return run_step("prune", params, compute)


# ================================================================================================
# export: a servable folder (pruning_core.export) of the final checkpoint
# ================================================================================================
def _export_keyparts(p):
    return {"format": p["fmt"]}, [p["checkpoint"]], p.get("model_revision")


define_step("export", _export_keyparts, lambda p: [_export_keyparts, export_task])


@_task("export")
def export_task(ctx: dict, checkpoint: dict, fmt: str, model_revision: str | None = None) -> dict:
    params = {"ctx": ctx, "checkpoint": checkpoint, "fmt": fmt, "model_revision": model_revision}

    def compute():
        from pruning_core.export import export_checkpoint

        store = open_store(ctx.get("store"))
        with scratch_dir() as d:
            res = export_checkpoint(store.local_path(checkpoint), Path(d) / f"servable-{fmt}", fmt)
            man = store.put_dir(res["path"], "servable", f"export:{fmt}")
        return {**man, "format": fmt, "layout": res["layout"]}

    return run_step("export", params, compute)


# ================================================================================================
# teacher: the dense model's top-k next-token log-probs over the distillation blocks (one artifact,
# computed once per model, text and k; every method and ratio of a sweep distils from it)
# ================================================================================================
def _teacher_keyparts(p):
    return {"top_k": p["top_k"], "dtype": p["dtype"]}, [p["model"], p["blocks"]], p["model"]["sha256"]


define_step("teacher", _teacher_keyparts, lambda p: [_teacher_keyparts, teacher_task])


@_task("teacher", gpu=True)
def teacher_task(ctx: dict, model: dict, blocks: dict, top_k: int | None, dtype: str = "float16",
                 batch_size: int = 4) -> dict:
    """`indices` int32 / `values` (fp16 log-probs) [N, T, k] and `kept_mass` [N, T] of the dense model
    over the blocks of `blocks` (a calibration artifact); the student's training never loads the teacher."""
    params = {"ctx": ctx, "model": model, "blocks": blocks, "top_k": top_k, "dtype": dtype}

    def compute():
        import torch

        from pruning_core.distill import teacher_topk

        m, _ = _open(model, ctx, "teacher")
        ids = load_calibration(blocks, ctx)
        with _bar("teacher", ids.shape[0], "block") as cb:
            t = teacher_topk(m, ids, top_k, batch_size=batch_size, progress=cb, dtype=getattr(torch, dtype))
        kept = float(t["kept_mass"].float().mean())
        man = _save_tensors(t, "teacher.safetensors", "teacher", "teacher", ctx,
                            meta={"top_k": t["indices"].shape[-1], "kept_mass": kept})
        return {**man, "top_k": int(t["indices"].shape[-1]), "kept_mass": kept,
                "tokens": int(ids.numel())}

    return run_step("teacher", params, compute)


def _samples_keyparts(p):
    s = {k: p[k] for k in ("n_samples", "seq_len", "seed", "temperature", "batch_size")}
    return s, [p["model"]], p["model"]["sha256"]


define_step("teacher_samples", _samples_keyparts, lambda p: [_samples_keyparts, teacher_samples_task])


@_task("teacher_samples", gpu=True)
def teacher_samples_task(ctx: dict, model: dict, n_samples: int, seq_len: int, seed: int,
                         temperature: float = 1.0, batch_size: int = 16) -> dict:
    """Distillation text the dense model writes itself (`recovery.settings.source: teacher-samples`):
    `n_samples` blocks of `seq_len` tokens sampled from BOS, stored like calibration blocks."""
    params = {"ctx": ctx, "model": model, "n_samples": n_samples, "seq_len": seq_len, "seed": seed,
              "temperature": temperature, "batch_size": batch_size}

    def compute():
        from pruning_core.distill import sample_from_teacher

        m, _ = _open(model, ctx, "teacher_samples")
        with _bar("teacher samples", n_samples, "block") as cb:
            ids = sample_from_teacher(m, n_samples, seq_len, seed=seed, temperature=temperature,
                                      batch_size=batch_size, progress=cb)
        return _save_tensors({"input_ids": ids}, "calibration.safetensors", "calibration", "teacher_samples", ctx)

    return run_step("teacher_samples", params, compute)


def _concat_keyparts(p):
    return {}, list(p["parts"]), None


define_step("concat_blocks", _concat_keyparts, lambda p: [_concat_keyparts, concat_blocks_task])


@_task("concat_blocks")
def concat_blocks_task(ctx: dict, parts: list[dict]) -> dict:
    """One block artifact: the blocks of `parts` (calibration-like artifacts of one block length), in order
    (`recovery.settings.mix_samples`: the training text's blocks, then the dense model's samples)."""
    params = {"ctx": ctx, "parts": parts}

    def compute():
        import torch

        blocks = [load_calibration(p, ctx) for p in parts]
        if len({b.shape[1] for b in blocks}) != 1:
            raise DataError("recovery.settings.seq_len", [b.shape[1] for b in blocks], "blocks of one length to mix")
        return _save_tensors({"input_ids": torch.cat(blocks)}, "calibration.safetensors", "calibration",
                             "concat_blocks", ctx)

    return run_step("concat_blocks", params, compute)


# ================================================================================================
# recover: LoRA (peft), replacement-layer training, or distillation from the teacher; `none` passes
# the checkpoint through
# ================================================================================================
def _recover_keyparts(p):
    settings = {"kind": p["kind"], "settings": p["settings"], "dtype": p.get("dtype")}
    if p["kind"] == "lora":  # LoRA trains on this text: its content, not its name
        settings["train_text"] = _source_fp(p.get("train_source", "pydoc"))
    if p.get("replacement_settings") is not None:
        settings["replacement_settings"] = p["replacement_settings"]
    inputs = [p["checkpoint"], p.get("calib")] + ([p["teacher"], p["blocks"]] if p.get("teacher") else [])
    return settings, inputs, p["model_revision"]


define_step("recover", _recover_keyparts, lambda p: [_recover_keyparts, recover_task], libraries=("peft",))


@_task("recover", gpu=True)
def recover_task(ctx: dict, checkpoint: dict, kind: str, settings: dict, model_revision: str,
                 train_source: str = "pydoc", seq_len: int = 256, calib: dict | None = None,
                 model: dict | None = None, dtype: str | None = None, teacher: dict | None = None,
                 blocks: dict | None = None, replacement_settings: dict | None = None) -> dict:
    """`lora`: LoRA on the training text, merged. `replacement` (LLM-Streamline): the replacement of
    the removed block is trained on the calibration blocks against the dense model (`model`), with
    the method's settings; the prune step before it is the same as for `recovery: none`. `distill`:
    the student learns the stored `teacher` on its `blocks` (after the replacement is trained, when
    `replacement_settings` are given)."""
    params = {"ctx": ctx, "checkpoint": checkpoint, "kind": kind, "settings": settings,
              "model_revision": model_revision, "calib": calib, "dtype": dtype, "train_source": train_source,
              "teacher": teacher, "blocks": blocks, "replacement_settings": replacement_settings}

    def compute():
        from pruning_core import recover as rec
        from pruning_core.checkpoint import load_pruned, save_pruned
        from pruning_core.data import load_text, tokenize_text
        from pruning_core.plan import PrunePlan

        store = open_store(ctx.get("store"))
        src = store.local_path(checkpoint)
        # the run's dtype (the dense model's, as in every other step) and placement: LoRA and distillation
        # train on the device (offload on a CPU is the same memory); the replacement keeps its layer resident
        placement = _placement(ctx, str(src), dtype or "auto", step="recover")
        if kind in ("lora", "distill"):
            if placement == "disk" or (placement == "offload" and _device(ctx).type != "cpu"):
                raise ConfigError("model.placement", placement,
                                  f"device for {kind} recovery (offload only on a CPU device)")
            placement = "device"
        clear_models()  # the pruned model is the only model this step holds
        m, tok = load_pruned(src, device=_device(ctx), dtype=dtype, placement=placement)
        plan = PrunePlan.load(src / "plan.json") if (src / "plan.json").exists() else None
        info = {}
        if kind == "replacement" or replacement_settings is not None:
            if model is None or calib is None or plan is None:
                raise ConfigError("recovery.kind", kind, "lora or none (replacement needs the dense model, the "
                                  "calibration set and the checkpoint's plan)")
            block = _dense_block(model, ctx, plan)  # the removed layers only: no second copy of the model
            with _bar("recover", 1, "step") as cb:
                m, info = rec.replacement_recover(m, block, plan, load_calibration(calib, ctx),
                                                  settings if kind == "replacement" else replacement_settings,
                                                  device=_device(ctx), progress=cb)
            del block
        if kind == "lora":
            train_ids = tokenize_text(tok, load_text(train_source, "train"))
            with _bar("lora", settings.get("steps", 0) or 1, "step") as cb:
                m, info = rec.lora_recover(m, tok, train_ids, settings, device=_device(ctx), progress=cb)
        elif kind == "distill":
            from pruning_core.distill import distill_recover

            if teacher is None or blocks is None:
                raise ConfigError("recovery.kind", kind, "lora, replacement or none (distill needs the teacher step)")
            with _bar("distill", settings.get("steps", 0) or 1, "step") as cb:
                m, dinfo = distill_recover(m, load_calibration(blocks, ctx), _load_tensors(teacher, ctx), settings,
                                           device=_device(ctx), progress=cb)
            info = {**dinfo, "replacement": info or None, "teacher_uri": teacher["uri"]}
        elif kind != "replacement":
            raise ConfigError("recovery.kind", kind, "lora, replacement or distill (the recoveries run as their own step)")
        with scratch_dir() as d:
            if placement == "device":
                path = save_pruned(m.to("cpu"), tok, plan, Path(d) / "checkpoint")
            else:  # layer by layer, shard by shard; the plan is recorded, not applied again
                from pruning_core.checkpoint import save_streaming

                path = save_streaming(m, tok, plan, Path(d) / "checkpoint", apply=False)
            man = store.put_dir(path, "checkpoint", f"recover:{kind}")
        keep = {k: checkpoint[k] for k in ("params_before", "params_after", "target_ratio", "removed_fraction",
                                           "decoder_params_before", "removed_decoder_fraction", "rounding", "uniform")
                if k in checkpoint}
        return {**man, **keep, "recovery": _jsonable(info)}

    return run_step("recover", params, compute)


class _bar:
    """`with _bar(desc, total, unit) as cb:` a step's transient progress bar, closed on any exit."""

    def __init__(self, desc: str, total: int, unit: str):
        self.bar, self.cb = _progress(desc, total, unit=unit)

    def __enter__(self):
        return self.cb

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


def _dense_block(model: dict, ctx: dict, plan) -> list:
    """The dense model's layers [start, end) that LLM-Streamline's replacement stands for, read from the
    dense checkpoint on the step's device (every other tensor of the dense model stays on `meta`)."""
    from pruning_core.adapters import adapter_for
    from pruning_core.loading import open_model
    from pruning_core.methods.streamline import replacement_of

    _, start, end, _ = replacement_of(plan)
    dense, _ = open_model(_model_path(model), placement="device", device=_device(ctx), dtype=model["dtype"],
                          trust_remote_code=model.get("trust_remote_code", False), with_tokenizer=False,
                          only_layers=list(range(start, end)))
    return [adapter_for(dense).layers(dense)[j] for j in range(start, end)]


def _jsonable(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return json.loads(json.dumps(obj, default=str))


# ================================================================================================
# evaluate: perplexity (protocol named), parameters, lm-eval tasks, efficiency
# ================================================================================================
def _eval_keyparts(p):
    """Settings, plus what the step reads beside the model, by content: the evaluation text actually
    tokenised, the offline lm-eval tasks (YAMLs and `pf_data.py`, read by lm-eval, not imported) with
    the texts they are built from, and the device that efficiency timings are measured on."""
    s = dict(p["settings"])
    s["eval_text"] = _source_fp(s.get("source", "pydoc"))
    tasks = set(s.get("tasks") or [])
    from pruning_core.evaltasks import TASK_DIR, TASKS

    if tasks & set(TASKS):
        from pruning_core.digest import folder_digest

        s["offline_tasks"] = {"files": folder_digest(TASK_DIR)[:16], "pydoc": _source_fp("pydoc"),
                              **({"pkgdocs": _source_fp("pkgdocs")} if any("pkgdocs" in t for t in tasks) else {})}
    if s.get("efficiency"):
        s["efficiency_device"] = _device_name(p.get("ctx") or {})
        # tokens/s and peak memory depend on where the weights live: the run's placement is part of the key
        s["efficiency_placement"] = (p.get("ctx") or {}).get("placement", "auto")
    return s, [p["target"]], p["model_revision"]


def _device_name(ctx: dict) -> str:
    """The hardware timings are measured on: the GPU's name, or the CPU model and thread count."""
    import torch

    dev = _device(ctx)
    if dev.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        import platform

        model = platform.processor()
    return f"{dev.type}:{model}:{torch.get_num_threads()} threads"


define_step("evaluate", _eval_keyparts, lambda p: [_eval_keyparts, evaluate_task],
            libraries=("lm_eval", "datasets", "peft"), lineage=lambda p: p["target"].get("kind"))


@_task("evaluate", gpu=True)
def evaluate_task(ctx: dict, target: dict, settings: dict, model_revision: str, label: str = "pruned",
                  dtype: str = "float32") -> dict:
    """Metrics of `target` (the dense model manifest or a checkpoint manifest) in `dtype`, stored as JSON."""
    params = {"ctx": ctx, "target": target, "settings": settings, "model_revision": model_revision, "dtype": dtype}

    def compute():
        from pruning_core.data import eval_tokens
        from pruning_core.metrics import flops_per_token, perplexity
        from pruning_core.surgery import count_params

        store = open_store(ctx.get("store"))
        path = target["uri"] if target.get("external") else str(store.local_path(target))
        dev = _device(ctx)
        # dense and pruned at the same dtype (the dense model's), under the run's placement; this one
        # model object serves perplexity, lm-eval and efficiency (no second load)
        m, tok = _open({"dtype": dtype, "trust_remote_code": target.get("trust_remote_code", False)}, ctx,
                       "evaluate", path=path)
        ids = eval_tokens(tok, settings.get("source", "pydoc"))
        t0 = time.perf_counter()
        ppl = perplexity(m, ids, seq_len=settings["ppl_seq_len"], max_windows=settings.get("ppl_windows"),
                         batch_size=settings.get("batch_size", 1))
        dt = time.perf_counter() - t0
        metrics: dict[str, Any] = {
            "ppl": ppl["ppl"], "ppl_protocol": ppl["protocol"], "ppl_tokens": ppl["tokens"],
            "params": count_params(m), "flops_per_token": flops_per_token(m),
            "eval_tokens_per_s": ppl["tokens"] / dt if dt > 0 else None,
        }
        tasks = settings.get("tasks") or []
        protocols: dict[str, str] = {"ppl": ppl["protocol"]}
        samples_man = None
        if tasks:
            import contextlib
            import io

            from pruning_core.evaluate import run_lm_eval

            with contextlib.redirect_stderr(io.StringIO()):  # lm-eval's own bars: the step's bar shows progress
                res = run_lm_eval(m, tasks, limit=settings.get("limit"), batch_size=8, device=str(dev), tokenizer=tok)
            for t, ms in res["results"].items():
                for k, v in ms.items():
                    if isinstance(v, (int, float)):
                        metrics[f"{t}.{k}"] = v
            lim = settings.get("limit")
            protocols.update({t: res.get("protocols", {}).get(t) or
                              ("lm_eval_0shot" + (f"_first{lim}" if lim else "")) for t in res["results"]})
            # per-item outputs: the stability figure (LLM-Streamline) compares dense and pruned ones
            samples_man = store.put_json(res.get("samples", {}), "samples.json", "samples", f"evaluate:{label}")
        if settings.get("efficiency"):
            from pruning_core import efficiency

            eff = efficiency.measure(m, tok, device=dev)
            for k, v in (eff or {}).items():
                if isinstance(v, (int, float)):
                    metrics[f"eff.{k}"] = v
        man = store.put_json(metrics, "metrics.json", "metrics", f"evaluate:{label}")
        from pruning_core.residency import placement_of

        where = placement_of(m)  # perplexity is layer-major off the device; lm-eval runs whole-model forwards
        used = {"ppl": f"{where}, " + ("layer-major" if where != "device" else "whole-model forwards")}
        if tasks:
            used["lm_eval"] = f"{where}, whole-model forwards"
        return {**man, "metrics": metrics, "protocols": protocols, "placement": used,
                **({"samples": samples_man} if samples_man else {})}

    return run_step("evaluate", params, compute)


# ================================================================================================
# report: always rebuilt (it records this run's timings and cache hits), stored + written to run dir
# ================================================================================================
@task(name="report", persist_result=False, retries=RETRIES, retry_delay_seconds=2, retry_condition_fn=retry_condition)
def report_task(ctx: dict, report: dict, run_dir: str) -> dict:
    store = open_store(ctx.get("store"))
    man = store.put_json(report, "report.json", "report", "report")
    out = Path(run_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".report.json.tmp"
        tmp.write_text(json.dumps({**report, "artifacts": {**report.get("artifacts", {}), "report": man["uri"]}},
                                  indent=1, default=str))
        os.replace(tmp, out / "report.json")
    except OSError as e:
        raise StorageError("run_dir", str(out), "a writable folder", str(e)) from None
    try:  # the human report (Markdown + plots) beside report.json; it never fails the run
        from pruning_core.report import render_markdown

        (out / "report.md").write_text(render_markdown(report, out / "plots"))
    except Exception as e:  # noqa: BLE001
        log.warning("report.md not written: %s", e)
    return man
