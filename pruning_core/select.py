"""From scores and a ratio to a PrunePlan: per-layer ratio schedules and lowest-score removal."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .adapters import Adapter
from .errors import ConfigError
from .plan import LayerPlan, PrunePlan

SCHEDULES: dict[str, Callable[..., list[float]]] = {}


def register_schedule(name: str, fn: Callable[..., list[float]]) -> None:
    SCHEDULES[name] = fn


def _uniform(target: float, n_layers: int, **_) -> list[float]:
    return [float(target)] * n_layers


register_schedule("uniform", _uniform)


def check_ratio(ratio: float, field: str = "ratio") -> float:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not (0.0 <= float(ratio) < 1.0):
        raise ConfigError(field, ratio, "a number in [0, 1)")
    return float(ratio)


def layer_ratios(schedule: str, target: float, n_layers: int, **kw) -> list[float]:
    check_ratio(target)
    if schedule not in SCHEDULES:
        raise ConfigError("schedule", schedule, ", ".join(sorted(SCHEDULES)))
    return SCHEDULES[schedule](target, n_layers, **kw)


def n_remove(n: int, r: float, field: str, layer: int, unit: str) -> int:
    k = int(math.floor(n * r + 0.5))
    if k >= n:
        raise ConfigError(field, r, f"a ratio that keeps at least one {unit} in layer {layer} "
                                    f"(it has {n}; accepted: ratio < {(n - 0.5) / n:.3f})")
    return k


def keep_heads(score: torch.Tensor, n_q: int, n_kv: int, r: float, gqa: str, layer: int) -> tuple[list[int], list[int]]:
    """Kept (query heads, KV heads) from per-query-head scores (lowest removed)."""
    rep = n_q // n_kv
    if gqa == "kv_group":
        g = score.double().view(n_kv, rep).sum(1)
        k = n_remove(n_kv, r, "ratio", layer, "KV group")
        drop = set(torch.argsort(g, stable=True)[:k].tolist())
        kv = [i for i in range(n_kv) if i not in drop]
        return [g_ * rep + j for g_ in kv for j in range(rep)], kv
    if gqa == "per_group":
        k = n_remove(rep, r, "ratio", layer, "query head per KV group")
        keep_q = []
        for g_ in range(n_kv):
            s = score[g_ * rep:(g_ + 1) * rep].double()
            drop = set(torch.argsort(s, stable=True)[:k].tolist())
            keep_q += [g_ * rep + j for j in range(rep) if j not in drop]
        return keep_q, list(range(n_kv))
    raise ConfigError("method.settings.gqa", gqa, "kv_group or per_group")


def keep_channels(score: torch.Tensor, r: float, layer: int) -> list[int]:
    n = score.numel()
    k = n_remove(n, r, "ratio", layer, "FFN channel")
    drop = set(torch.argsort(score.double(), stable=True)[:k].tolist())
    return [i for i in range(n) if i not in drop]


def plan_from_scores(
    model: nn.Module,
    adapter: Adapter,
    scores: dict[str, torch.Tensor],
    ratio: float,
    targets: tuple[str, ...] = ("heads", "ffn"),
    gqa: str = "kv_group",
    per_layer: list[float] | None = None,
    method: str = "",
    settings: dict | None = None,
    uniform_heads: bool = False,
) -> PrunePlan:
    """Remove the lowest-scoring units in every layer: round(n * r_i) of them. `uniform_heads`
    (the `servable: vllm` constraint): heads at the target ratio in every layer, FFN at r_i."""
    check_ratio(ratio)
    shapes = adapter.shapes(model)
    ratios = per_layer if per_layer is not None else [ratio] * len(shapes)
    lps = []
    for i, s in enumerate(shapes):
        lp = LayerPlan(i)
        r = ratios[i]
        rh = ratio if uniform_heads else r
        if "heads" in targets and f"heads.{i}" in scores and rh > 0:
            lp.heads, lp.kv_heads = keep_heads(scores[f"heads.{i}"], s.n_heads, s.n_kv_heads, rh, gqa, i)
        if "ffn" in targets and f"ffn.{i}" in scores and r > 0:
            lp.ffn = keep_channels(scores[f"ffn.{i}"], r, i)
        lps.append(lp)
    plan = PrunePlan(method=method, settings=settings or {}, layers=lps, target_ratio=ratio,
                     per_layer_ratio=list(ratios))
    from .metrics import plan_params

    plan.params_before, plan.params_after = plan_params(model, plan)
    return plan
