"""Human reports: one run's Markdown report with plots, and the comparison table across runs.

`report.json` (written by `flows.compress`) is the input. Its `metrics_before` / `metrics_after` may be the pipeline's
flat `metrics.json` (`ppl` + `ppl_protocol`, `task.metric`, `eff.*`) or the nested shape of
`evaluate.metrics_record`; both are read through `evaluate.flatten_metrics`, so every figure is
shown with its protocol named:

* `ppl.fixed_window_256`: fixed-window perplexity on the eval text (SparseGPT/Wanda protocol),
* `pydoc_rolling/word_perplexity`: lm-eval's rolling word perplexity (`lm_eval_rolling_word`),
* `task/acc`, `task/acc_norm`: lm-eval accuracies (0-shot unless the run says otherwise).

`compare(reports)` renders the table a paper would print (method x ratio -> params, PPL, per-task
accuracy, average, retention, speed-up) with a dense row per model, and writes the sweep plots.
Retention is recomputed here with `evaluate.retention` (PPL inverted), not read from the report.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from .evaluate import FIXED_PROTOCOL, flatten_metrics, retention

ACC_METRICS = ("acc", "acc_norm")
PPL_METRICS = ("word_perplexity", "perplexity")


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if abs(v) >= 1e5:
            return f"{v:.3g}"
        return f"{v:.{nd}f}"
    return str(v)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(c if isinstance(c, str) else _fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _ppl_key(flat: dict) -> str | None:
    keys = sorted(k for k in flat if k.startswith("ppl."))
    if f"ppl.{FIXED_PROTOCOL}" in keys:
        return f"ppl.{FIXED_PROTOCOL}"
    return keys[0] if keys else ("ppl" if "ppl" in flat else None)


def _task_columns(flats: list[dict]) -> list[str]:
    """`task/metric` columns: acc and acc_norm of every task, then the perplexity of perplexity tasks."""
    keys = {k for f in flats for k in f if "/" in k}
    tasks = sorted({k.split("/")[0] for k in keys})
    cols = []
    for t in tasks:
        cols += [f"{t}/{m}" for m in ACC_METRICS if f"{t}/{m}" in keys]
        if not any(f"{t}/{m}" in keys for m in ACC_METRICS):
            cols += [f"{t}/{m}" for m in PPL_METRICS if f"{t}/{m}" in keys][:1]
    return cols


def _avg_acc(flat: dict, cols: list[str]) -> float | None:
    """Mean of the tasks' `acc` (acc_norm where a task has no acc), over the columns present."""
    vals = []
    for t in sorted({c.split("/")[0] for c in cols}):
        v = flat.get(f"{t}/acc", flat.get(f"{t}/acc_norm"))
        if v is not None:
            vals.append(v)
    return sum(vals) / len(vals) if vals else None


def _speedup(before: dict, after: dict) -> float | None:
    for key, inv in (("decode_tokens_per_s", False), ("prefill_ms", True), ("eval_tokens_per_s", False)):
        b, a = before.get(key), after.get(key)
        if b and a:
            return (b / a) if inv else (a / b)
    return None


def _loss_curve(report: dict) -> list[float] | None:
    cands = [report.get("recovery_info"), report.get("recovery"), (report.get("steps") or {}).get("recover")]
    for c in cands:
        if isinstance(c, dict):
            if isinstance(c.get("loss_curve"), list):
                return c["loss_curve"]
            inner = c.get("recovery")
            if isinstance(inner, dict) and isinstance(inner.get("loss_curve"), list):
                return inner["loss_curve"]
    return report.get("loss_curve") if isinstance(report.get("loss_curve"), list) else None


def distill_lines(info: dict) -> list[str]:
    """What a distillation cost and how faithful its teacher is: trained part, tokens, time, teacher size."""
    out = [f"Trained `{info.get('train')}` ({info.get('trainable_params', 0) / 1e6:.2f} M parameters) on "
           f"{info.get('tokens_seen')} tokens in {info.get('seconds', 0):.0f} s ({info.get('tokens_per_s', 0):.0f} tokens/s)."]
    if info.get("teacher_bytes") is not None:
        out.append(f"Teacher: top-{info.get('top_k')} log-probs, {info['teacher_bytes'] / 2**20:.1f} MiB on disk"
                   + (f", mean kept probability {info['kept_mass']:.3f}" if info.get("kept_mass") is not None else "") + ".")
    if info.get("k_faithful") is False:
        kmin = (info.get("settings") or {}).get("min_kept_mass")
        out.append(f"**Warning: k = {info.get('top_k')} keeps less than {kmin} of the teacher's probability on "
                   "average: too small to be faithful (raise `recovery.settings.top_k`).**")
    return out


def _recovery_name(report: dict) -> str:
    r = report.get("recovery")
    if isinstance(r, dict):
        return str(r.get("kind", "lora" if r.get("loss_curve") else "none"))
    return str(r) if r else "none"


def _params_m(v) -> str:
    return f"{v / 1e6:.1f} M" if isinstance(v, (int, float)) and v else "–"


def compare_rows(reports: list[dict]) -> tuple[list[str], list[list[Any]], list[dict]]:
    """(headers, rows, sweep points) of the comparison; see `compare`."""
    befores = [flatten_metrics(r.get("metrics_before")) for r in reports]
    afters = [flatten_metrics(r.get("metrics_after")) for r in reports]
    cols = _task_columns(befores + afters)
    ppl_keys = [k for k in (_ppl_key(f) for f in befores + afters) if k]
    ppl_key = max(set(ppl_keys), key=ppl_keys.count) if ppl_keys else None
    ppl_head = f"PPL ({ppl_key[4:]})" if ppl_key and ppl_key.startswith("ppl.") else "PPL"
    headers = ["model", "method", "ratio", "recovery", "params", "removed (decoder)", ppl_head,
               *[c.replace("/", " ") for c in cols], "avg acc", "retention", "speed-up"]
    if any("stability" in r for r in reports):
        headers.append("stability")
    ids = any("id" in r for r in reports)  # runs of one model, method and ratio differ in other settings
    if ids:
        headers.append("run")
    rows, points, dense_done = [], [], set()
    order = sorted(range(len(reports)), key=lambda i: (str(reports[i].get("model")), str(reports[i].get("method")),
                                                       float(reports[i].get("target_ratio") or 0)))
    for i in order:
        r, b, a = reports[i], befores[i], afters[i]
        model = str(r.get("model", "?"))
        if model not in dense_done and b:
            dense_done.add(model)
            row = [model, "dense", 0.0, "–", _params_m(r.get("params_before")), "–", b.get(ppl_key) if ppl_key else None,
                   *[b.get(c) for c in cols], _avg_acc(b, cols), 1.0, 1.0]
            rows.append(row + (["–"] if "stability" in headers else []) + (["–"] if ids else []))
        ret = retention(b, a) if b and a else {}
        dec = r.get("removed_decoder_fraction")
        row = [model, str(r.get("method", "?")), r.get("target_ratio"), _recovery_name(r), _params_m(r.get("params_after")),
               f"{100 * dec:.1f} %" if isinstance(dec, (int, float)) else "–", a.get(ppl_key) if ppl_key else None, *[a.get(c) for c in cols], _avg_acc(a, cols),
               ret.get("average"), _speedup(b, a)]
        if "stability" in headers:
            s = r.get("stability")
            row.append(f"{100 * s:.1f} %" if isinstance(s, (int, float)) else "–")
        if ids:
            row.append(str(r.get("id") or r.get("name") or "–"))
        rows.append(row)
        ratio = float(r.get("target_ratio") or 0.0)
        pt = {"method": f"{r.get('method')}" + ("" if _recovery_name(r) == "none" else f"+{_recovery_name(r)}"),
              "ratio": ratio, "ppl": a.get(ppl_key) if ppl_key else None, "acc": _avg_acc(a, cols)}
        points.append(pt)
        if b:
            points.append({"method": pt["method"], "ratio": 0.0, "ppl": b.get(ppl_key) if ppl_key else None,
                           "acc": _avg_acc(b, cols)})
    return headers, rows, points


def compare(reports: list[dict], out_dir: str | Path | None = None, plots: bool = True,
            link_base: str | Path | None = None) -> str:
    """The table a paper would print, across runs: method x ratio -> params, PPL (protocol named),
    per-task accuracy, average accuracy, retention (mean after/before over quality metrics, PPL
    inverted) and speed-up (decode tokens/s after/before, else prefill, else eval throughput).
    Writes `sweep.png` (PPL and average accuracy versus ratio, one line per method, dense at 0) into
    `out_dir` (default `$PRUNEFLOW_HOME/compare/<digest of the run names>`); returns Markdown, with the
    plot linked relative to `link_base` when given (e.g. the folder of the Markdown file it goes into)."""
    if not reports:
        from .errors import DataError

        raise DataError("runs", [], "at least one report.json")
    headers, rows, points = compare_rows(reports)
    points = list({(p["method"], p["ratio"]): p for p in points}.values())  # one dense point per method
    md = [_table(headers, rows)]
    md.append("\nretention: mean over quality metrics of after/before (perplexities inverted); "
              "speed-up: decode tokens/s after/before (prefill or eval throughput when decode was not measured).")
    if plots:
        if out_dir is None:
            from .models import home

            names = json.dumps(sorted(str(r.get("id", r.get("name", i))) for i, r in enumerate(reports)))
            out_dir = home() / "compare" / hashlib.sha256(names.encode()).hexdigest()[:12]
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        metrics = tuple(m for m in ("ppl", "acc") if any(p.get(m) is not None for p in points))
        if metrics:
            from .plots import plot_sweep

            path = plot_sweep(points, out / "sweep.png", metrics=metrics, title="pruned vs ratio (dense at 0)")
            link = os.path.relpath(path, link_base) if link_base is not None else str(path)
            md.append(f"\n![sweep: PPL and average accuracy versus ratio]({link})")
        (out / "compare.md").write_text("\n".join(md) + "\n")
    return "\n".join(md)


# the names the `pruneflow compare` command looks for
compare_table = compare


def render_markdown(report: dict, plots_dir: str | Path | None = None) -> str:
    """One run's human report: what was removed, every metric before/after/retention with its
    protocol, efficiency, timings and cache, the recovery loss curve and per-layer plot (if `plots_dir`)."""
    b, a = flatten_metrics(report.get("metrics_before")), flatten_metrics(report.get("metrics_after"))
    ret = retention(b, a)
    title = f"# {report.get('model')} — {report.get('method')} at {report.get('target_ratio')}"
    md = [title, ""]
    pb, pa = report.get("params_before"), report.get("params_after")
    md.append(_table(["", "value"], [
        ["model", str(report.get("model"))], ["method", str(report.get("method"))],
        ["settings", "`" + json.dumps(report.get("settings") or {}, default=str)[:200] + "`"],
        ["target ratio", report.get("target_ratio")], ["recovery", _recovery_name(report)],
        ["params before", pb], ["params after", pa],
        ["removed", f"{100 * report['removed_fraction']:.1f} %" if isinstance(report.get("removed_fraction"), (int, float))
         else "–"],
        ["removed of decoder-layer params", f"{100 * report['removed_decoder_fraction']:.1f} %"
         if isinstance(report.get("removed_decoder_fraction"), (int, float)) else "–"],
        *([["rounding", str(report["rounding"])]] if report.get("rounding") else []),
        *([["placement (dense and pruned)", f"{report['placement'].get('placement')} "
            f"({report['placement'].get('reason')})"]] if isinstance(report.get("placement"), dict) else []),
    ]))
    md += ["", "## Metrics", ""]
    keys = sorted(set(b) | set(a), key=lambda k: (not k.startswith("ppl"), "/" not in k, k))
    # with a recovery, the pruned model before it too: what the recovery gave back
    u = [flatten_metrics(report["metrics_before_recovery"])] if report.get("metrics_before_recovery") else []
    mid = ["pruned, before recovery"] if u else []
    md.append(_table(["metric", "dense", *mid, f"after {_recovery_name(report)}" if u else "pruned", "retention"],
                     [[k, b.get(k), *[x.get(k) for x in u], a.get(k), ret.get(k)] for k in keys]))
    if "average" in ret:
        md.append(f"\nAverage retention (quality metrics): **{ret['average']:.3f}**")
    if isinstance(report.get("stability"), (int, float)):
        md.append(f"\nStability (LLM-Streamline): **{100 * report['stability']:.1f} %**")
    md.append("\n" + _protocols_line(report, b, a))
    if report.get("timings"):
        md += ["", "## Steps", ""]
        why = report.get("cache_why") or {}
        md.append(_table(["step", "seconds", "cache", "why it was computed"],
                         [[s, t, (report.get("cache") or {}).get(s, "–"), why.get(s, "")]
                          for s, t in report["timings"].items()]))
    if plots_dir is not None:
        md += _figures(report, Path(plots_dir))
    return "\n".join(md) + "\n"


def _protocols_line(report: dict, b: dict, a: dict) -> str:
    """The protocols this run used, by name (`report["protocols"]` from the evaluate steps)."""
    prot = dict(report.get("protocols") or {})
    keys = set(b) | set(a)
    parts = []
    for k in sorted(x for x in keys if x.startswith("ppl.")):
        name = k[4:]
        seq = name.rsplit("_", 1)[-1]
        desc = (f"non-overlapping {seq}-token windows of the evaluation text (SparseGPT/Wanda protocol)"
                if name.startswith("fixed_window_") else "see the evaluate step")
        parts.append(f"`{k}` = {desc}")
    for t, p in sorted((t, p) for t, p in prot.items() if t != "ppl"):
        parts.append(f"`{t}/*` = lm-eval, protocol `{p}`")
    return "Protocols: " + ("; ".join(parts) if parts else "–") + "."


def _figures(report: dict, pdir: Path) -> list[str]:
    """The run's plots (loss curve of the recovery, kept structure per layer, per-layer ratios) and
    their sections; a plot that fails is named in the report (and logged), never silently dropped."""
    import logging

    from . import plots

    pdir.mkdir(parents=True, exist_ok=True)
    md: list[str] = []

    def rel(p: Path) -> str:
        return str(p.relative_to(pdir.parent)) if pdir.parent in p.parents else str(p)

    def draw(fn, *args, **kw) -> Path | None:
        try:
            return fn(*args, **kw)
        except Exception as e:  # noqa: BLE001 - the report is written; the failure is shown in it
            logging.getLogger("pruneflow.report").warning("plot %s not drawn: %s", fn.__name__, e)
            md.append(f"\n(plot `{fn.__name__}` not drawn: {type(e).__name__}: {e})")
            return None

    curve = _loss_curve(report)
    info = report.get("recovery_info") or {}
    if curve:
        kind = info.get("kind") or _recovery_name(report)
        what = {"replacement": "replacement (MSE to the removed block's output)",
                "distill": "distillation (KL to the dense model's next-token distribution)"}.get(kind, "LoRA (LM loss)")
        md += ["", "## Recovery", "", f"{what}: training loss {curve[0]:.4g} → {curve[-1]:.4g} over {len(curve)} steps."]
        if kind == "distill":
            md += distill_lines(info)
        if isinstance(info.get("val_mse_before"), (int, float)):
            md.append(f"Validation MSE {info['val_mse_before']:.4g} → {info['val_mse_after']:.4g} "
                      f"(best step {info.get('best_step')}).")
        p = draw(plots.plot_loss_curves, curve, pdir / "recovery_loss.png", title=f"recovery loss ({kind})")
        if p:
            md += ["", f"![recovery loss]({rel(p)})"]
    layers = report.get("layers")
    if isinstance(layers, list) and layers:
        md += ["", "## What was kept", ""]
        p = draw(plots.plot_kept_per_layer, {"layers": layers, "method": report.get("method")},
                 pdir / "kept_per_layer.png", full=report.get("full_sizes"))
        if p:
            md.append(f"![kept per layer]({rel(p)})")
        ratios = [lp.get("ratio") for lp in layers]
        if all(isinstance(r, (int, float)) for r in ratios):
            p = draw(plots.plot_layer_ratios, ratios, pdir / "layer_ratios.png", target=report.get("target_ratio"))
            if p:
                md += ["", f"![per-layer ratios]({rel(p)})"]
        full = report.get("full_sizes") or {}
        md += ["", _table(["layer", "kept", f"q heads /{full.get('heads', '?')}", f"KV heads /{full.get('kv_heads', '?')}",
                           f"FFN /{full.get('ffn', '?')}", "replacement", "params removed"],
                          [[str(lp.get("index")), "yes" if lp.get("keep", True) else "no",
                            _kept(lp.get("heads"), full.get("heads"), lp), _kept(lp.get("kv_heads"), full.get("kv_heads"), lp),
                            _kept(lp.get("ffn"), full.get("ffn"), lp), lp.get("replacement") or "–",
                            f"{100 * lp['ratio']:.1f} %" if isinstance(lp.get("ratio"), (int, float)) else "–"]
                           for lp in layers])]
    search = (report.get("plan_notes") or {}).get("search")
    if isinstance(search, dict):
        md += ["", "## Searched widths (`schedule: search`)", "", search_line(search, (report.get("cache") or {}))]
        prof = search.get("profile") or {}
        if search.get("ratios"):
            p = draw(plots.plot_searched_widths, search["ratios"], prof.get("ratios"), pdir / "searched_widths.png",
                     profile_name=prof.get("name", "profile"), kept_ffn=search.get("kept_ffn"),
                     kept_q=search.get("kept_q"))
            if p:
                md += ["", f"![searched widths]({rel(p)})"]
    return md


def search_line(search: dict, cache: dict) -> str:
    """The search's cost and result in one line: tables (time, reused or computed), solve, candidates."""
    mem = search.get("memory_bytes")
    at = search.get("memory_at") or {}
    tables = "reused (cache hit)" if cache.get("layer_tables") == "hit" or search.get("tables_reused") else "computed"
    return (f"Per-layer tables {tables}, built in {_fmt(search.get('tables_seconds'), 1)} s; solve "
            f"{_fmt(search.get('solve_seconds'), 3)} s; candidates scored by the model: "
            f"{search.get('candidates_scored', 0)} (no evolutionary refinement); estimated cost (KL to dense, "
            f"additive): {_fmt(search.get('cost'), 4)}; params after {search.get('params_after')}; serving memory "
            f"{_fmt(mem / 2**20 if isinstance(mem, (int, float)) else None, 1)} MiB at seq_len {at.get('seq_len')}, "
            f"batch {at.get('batch')}, {at.get('bytes_per_param')} B/param.")


def _kept(n, full, lp) -> str:
    if not lp.get("keep", True):
        return "0"
    return str(n if n is not None else (full if full is not None else "all"))


def write_report(report: dict, folder: str | Path) -> dict[str, Path]:
    """Write `report.json` and `report.md` (+ `plots/`) into `folder`, atomically per file."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in (("report.json", json.dumps(report, indent=1, default=str)),
                       ("report.md", render_markdown(report, out / "plots"))):
        tmp = out / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, out / name)
        paths[name] = out / name
    return paths
