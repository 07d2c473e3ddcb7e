"""PNG plots of what a pruning run did: pure functions from plain dicts/lists to a PNG file.

Used by the MLflow tracking task (logged as run artifacts) and by the human report. No pyplot global
state: every plot builds its own ``matplotlib.figure.Figure`` on the Agg canvas, so the functions are
safe to call from worker threads and never open a window.

- :func:`plot_kept_per_layer`   kept query heads / KV heads / FFN channels / layers, per layer (from a plan dict)
- :func:`plot_scores_per_layer` importance-score distribution per layer (``heads.{i}`` / ``ffn.{i}`` vectors)
- :func:`plot_sweep`            perplexity and accuracy versus pruning ratio, one line per method
- :func:`plot_loss_curves`      recovery training loss curves
- :func:`plot_layer_ratios`     realised fraction of each layer's parameters removed, with the target
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import DataError
from .util import finite_float as _num

__all__ = ["plot_kept_per_layer", "plot_layer_ratios", "plot_scores_per_layer", "plot_sweep", "plot_loss_curves"]


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)  # atomic: never a half-written PNG
    return path


def _count(kept: Sequence[int] | int | None, full: int | None) -> float:
    """A kept list's length, or a kept count as it is (the run report's compact per-layer view)."""
    if kept is None:
        return float("nan") if full is None else float(full)
    return float(kept) if isinstance(kept, int) else float(len(kept))


def plot_kept_per_layer(plan: Mapping[str, Any], path: str | os.PathLike,
                        full: Mapping[str, int] | None = None, title: str | None = None) -> Path:
    """Bar chart of what every layer keeps, from a ``PrunePlan.to_dict()`` (``plan.json``).

    ``full`` gives the unpruned sizes ``{"heads": n_q, "kv_heads": n_kv, "ffn": d_ff}`` (else
    ``plan["notes"]["full_sizes"]``); with them the y axis is the kept fraction, without them the kept
    count (a list left at ``None``, "all kept", is then drawn at the largest index seen + 1, a lower
    bound). Kinds the plan never restricts and ``full`` does not name are left out. Removed layers are
    shaded.
    """
    layers = plan.get("layers") if isinstance(plan, Mapping) else None
    if not layers:
        raise DataError("plan.layers", layers, "a plan dict with a non-empty 'layers' list")
    full = {k: int(v) for k, v in dict(full or plan.get("notes", {}).get("full_sizes", {}) or {}).items() if v}
    kinds = [("heads", "query heads"), ("kv_heads", "KV heads"), ("ffn", "FFN channels")]
    used = [k for k, _ in kinds if k in full or any(lp.get(k) is not None for lp in layers)] or ["heads"]
    as_fraction = all(k in full for k in used)
    if not as_fraction:  # counts; a layer left at None ("all kept") is drawn at a lower bound of the full size
        for k in used:
            if k not in full:
                seen = [lp[k] if isinstance(lp[k], int) else max(lp[k]) + 1 for lp in layers if lp.get(k)]
                full[k] = max(seen) if seen else 0
    kinds = [(k, label) for k, label in kinds if k in used]
    fig = Figure(figsize=(max(6.0, 0.28 * len(layers) + 2), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    idx = [int(lp.get("index", i)) for i, lp in enumerate(layers)]
    width = 0.8 / len(kinds)
    for j, (k, label) in enumerate(kinds):
        vals = []
        for lp in layers:
            n = full.get(k)
            v = 0.0 if not lp.get("keep", True) else _count(lp.get(k), n)
            vals.append(v / n if as_fraction and n else v)
        ax.bar([i + (j - (len(kinds) - 1) / 2) * width for i in idx], vals, width=width, label=label)
    for lp, i in zip(layers, idx):
        if not lp.get("keep", True):
            ax.axvspan(i - 0.5, i + 0.5, color="0.85", zorder=0)
        if lp.get("replacement"):
            ax.annotate("R", (i, 1.02 if as_fraction else 0), ha="center", fontsize=7)
    kept = sum(1 for lp in layers if lp.get("keep", True))
    ax.set_xlabel(f"layer (kept {kept}/{len(layers)}; grey = removed, R = replacement)")
    ax.set_ylabel("kept fraction" if as_fraction else "kept units")
    if as_fraction:
        ax.set_ylim(0, 1.1)
    ax.set_title(title or f"{plan.get('method', '?')}: kept structure per layer")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_layer_ratios(ratios: Sequence[float], path: str | os.PathLike, target: float | None = None,
                      title: str | None = None) -> Path:
    """Bar chart of the fraction of each decoder layer's parameters removed (the plan's
    ``per_layer_ratio``), with the run's target as a line."""
    vals = [float(r) for r in ratios]
    if not vals:
        raise DataError("plan.per_layer_ratio", list(ratios), "a non-empty list of per-layer fractions")
    fig = Figure(figsize=(max(6.0, 0.22 * len(vals) + 2), 3.0))
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(vals)), vals, width=0.8)
    if target is not None:
        ax.axhline(float(target), color="C3", linestyle="--", linewidth=1, label=f"target {float(target):g}")
        ax.legend(fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("parameters removed")
    ax.set_ylim(0, max(1e-9, max(vals + [float(target or 0)])) * 1.15)
    ax.set_title(title or "removed fraction of each layer's parameters")
    return _save(fig, path)


def plot_searched_widths(searched: Sequence[float], profile: Sequence[float] | None, path: str | os.PathLike,
                         profile_name: str = "profile", kept_ffn: Sequence[int] | None = None,
                         kept_q: Sequence[int] | None = None) -> Path:
    """`schedule: search`: the fraction of each layer's parameters the search removed (bars) against the
    method's fixed profile at the same overall ratio (line); the kept FFN widths / query heads as labels."""
    vals = [float(r) for r in searched]
    if not vals:
        raise DataError("plan.notes.search.ratios", list(searched), "a non-empty list of per-layer fractions")
    fig = Figure(figsize=(max(6.0, 0.25 * len(vals) + 2), 3.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(vals)), vals, width=0.8, label="searched")
    if profile:
        ax.plot(range(len(profile)), [float(r) for r in profile], color="C3", marker=".", linewidth=1.2,
                label=f"fixed profile ({profile_name})")
    if kept_ffn is not None:
        for i, (v, f) in enumerate(zip(vals, kept_ffn)):
            q = f"/{kept_q[i]}q" if kept_q is not None else ""
            ax.text(i, v, f"{f}{q}", rotation=90, fontsize=5, ha="center", va="bottom")
    ax.legend(fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("parameters removed")
    top = max(vals + [float(r) for r in (profile or [])] + [1e-9])
    ax.set_ylim(0, top * 1.3)
    ax.set_title("searched per-layer widths vs the fixed profile (labels: kept FFN / query heads)")
    return _save(fig, path)


def _layer_key(name: str) -> tuple[str, int] | None:
    m = re.fullmatch(r"(\w+)\.(\d+)", name)
    return (m.group(1), int(m.group(2))) if m else None


def plot_scores_per_layer(scores: Mapping[str, Sequence[float]], path: str | os.PathLike,
                          title: str | None = None) -> Path:
    """Box plot of importance scores per layer, one panel per unit kind.

    ``scores`` maps ``"{kind}.{layer}"`` (e.g. ``heads.3``, ``ffn.3``) to a score vector (list, numpy
    array or torch tensor); keys of another shape are ignored. A layer-level kind (e.g. ``layer`` with a
    scalar per layer) is drawn as a line.
    """
    groups: dict[str, dict[int, list[float]]] = {}
    for name, v in scores.items():
        key = _layer_key(name)
        if key is None:
            continue
        vals = v.tolist() if hasattr(v, "tolist") else v
        vals = [float(x) for x in (vals if isinstance(vals, (list, tuple)) else [vals])]
        groups.setdefault(key[0], {})[key[1]] = [x for x in vals if math.isfinite(x)]
    if not groups:
        raise DataError("scores", sorted(scores)[:5], "keys like 'heads.0' / 'ffn.0' mapping to score vectors")
    fig = Figure(figsize=(8, 2.8 * len(groups)))
    for p, (kind, per_layer) in enumerate(sorted(groups.items()), start=1):
        ax = fig.add_subplot(len(groups), 1, p)
        layers = sorted(per_layer)
        if all(len(per_layer[i]) <= 1 for i in layers):
            ax.plot(layers, [per_layer[i][0] if per_layer[i] else float("nan") for i in layers], marker="o")
        else:
            ax.boxplot([per_layer[i] or [float("nan")] for i in layers], positions=layers, widths=0.6,
                       showfliers=False)
        ax.set_ylabel(f"{kind} score")
        ax.set_xlabel("layer")
        if p == 1:
            ax.set_title(title or "importance scores per layer")
    return _save(fig, path)


def plot_sweep(points: Sequence[Mapping[str, Any]], path: str | os.PathLike,
               metrics: Sequence[str] = ("ppl", "acc"), title: str | None = None) -> Path:
    """Metrics versus pruning ratio for a sweep, one line per method, one panel per metric.

    ``points``: ``[{"method": "slimgpt", "ratio": 0.2, "ppl": 18.1, "acc": 0.41}, ...]``. A point lacking
    a metric is skipped for that panel; a panel with no point at all is left out. Perplexity is drawn
    on a log axis.
    """
    if not points:
        raise DataError("sweep.points", [], "at least one {'method', 'ratio', <metric>} point")
    panels = [m for m in metrics if any(_num(p.get(m)) is not None for p in points)]
    if not panels:
        raise DataError("sweep.metrics", list(metrics), f"metrics present in the points ({sorted(points[0])})")
    fig = Figure(figsize=(5.0 * len(panels), 3.6))
    for j, metric in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), j)
        by_method: dict[str, list[tuple[float, float]]] = {}
        for p in points:
            y, x = _num(p.get(metric)), _num(p.get("ratio"))
            if y is not None and x is not None:
                by_method.setdefault(str(p.get("method", "?")), []).append((x, y))
        for method, xy in sorted(by_method.items()):
            xy.sort()
            ax.plot([a for a, _ in xy], [b for _, b in xy], marker="o", label=method)
        if metric.lower().startswith("ppl") or "perplexity" in metric.lower():
            ax.set_yscale("log")
        ax.set_xlabel("pruning ratio")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "sweep: metrics versus ratio")
    return _save(fig, path)


def plot_loss_curves(curves: Mapping[str, Sequence[float]] | Sequence[float], path: str | os.PathLike,
                     title: str | None = None) -> Path:
    """Recovery loss per step: a list of losses, or ``{name: [losses]}`` for several curves."""
    if not isinstance(curves, Mapping):
        curves = {"loss": curves}
    curves = {k: [float(x) for x in v] for k, v in curves.items() if v is not None and len(v)}
    if not curves:
        raise DataError("recovery.losses", [], "a non-empty list of loss values")
    fig = Figure(figsize=(6, 3.4))
    ax = fig.add_subplot(1, 1, 1)
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=7)
    ax.set_title(title or "recovery loss")
    return _save(fig, path)
