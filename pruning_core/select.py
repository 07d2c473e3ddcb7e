"""From scores and a ratio to a PrunePlan: per-layer ratio schedules (uniform, log / linear increase
/ decrease), the parameter-budget solver SlimGPT and FLAP share, and lowest-score removal."""

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
SCHEDULE_NAMES = ("log_increase", "linear_increase", "uniform", "log_decrease", "linear_decrease")


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


# -- per-layer ratio schedules and the parameter-budget solver (SlimGPT §3.4; FLAP's UL-UM counts) --


def schedule_profile(schedule: str, n_layers: int) -> list[float]:
    """p_i in [0, 1] with r_i = r_0 + (r_last − r_0)·p_i (uniform: p_i = 1)."""
    L = n_layers
    if schedule == "uniform":
        return [1.0] * L
    if schedule in ("log_increase", "log_decrease"):
        p = [math.log(1 + i) / math.log(L) if L > 1 else 1.0 for i in range(L)]
    elif schedule in ("linear_increase", "linear_decrease"):
        p = [i / (L - 1) if L > 1 else 1.0 for i in range(L)]
    else:
        raise ConfigError("schedule", schedule, ", ".join(SCHEDULE_NAMES))
    return p[::-1] if schedule.endswith("decrease") else p


def schedule_ratios(schedule: str, r_last: float, n_layers: int, r0_fraction: float = 0.25) -> list[float]:
    f = 1.0 if schedule == "uniform" else r0_fraction
    return [r_last * (f + (1 - f) * p) for p in schedule_profile(schedule, n_layers)]


def _scaled_schedule(name: str):
    def fn(target: float, n_layers: int, r0_fraction: float = 0.25, **_) -> list[float]:
        base = schedule_ratios(name, 1.0, n_layers, r0_fraction)
        return [target * b * n_layers / sum(base) for b in base]  # mean = target (before rounding)

    return fn


for _name in SCHEDULE_NAMES:
    if _name != "uniform":
        register_schedule(_name, _scaled_schedule(_name))


def unit_counts(model, adapter, gqa: str) -> list[dict]:
    """Per layer: number of head units, params per head unit, FFN size, params per channel."""
    out = []
    for layer in adapter.layers(model):
        s = adapter.layer_shape(model, layer)
        if s.kind != "decoder":
            out.append(None)
            continue
        hidden = adapter.proj(layer, adapter.o).out_features
        rep = s.n_heads // s.n_kv_heads
        per_head = 2 * s.head_dim * hidden  # q rows + o columns
        if gqa == "kv_group" or rep == 1:
            units, unit_params, per_unit_cap = s.n_kv_heads, rep * per_head + 2 * s.head_dim * hidden, None
        else:
            units, unit_params, per_unit_cap = s.n_kv_heads, s.n_kv_heads * per_head, rep  # m heads / group
        ch = (len(adapter.mlp_in) + 1) * hidden
        out.append(dict(units=units, unit_params=unit_params, per_group=per_unit_cap, ffn=s.ffn, ch_params=ch,
                        total=sum(p.numel() for p in layer.parameters())))
    return out


def _removed(u: dict, r: float, head_scale: float = 1.0) -> tuple[int, int]:
    """(head units, FFN channels) removed at ratio r (heads at r·head_scale); at least one of each kept."""
    n_units = u["per_group"] if u["per_group"] else u["units"]
    kh = min(int(math.floor(n_units * r * head_scale + 0.5)), n_units - 1)
    kf = min(int(math.floor(u["ffn"] * r + 0.5)), u["ffn"] - 1)
    return max(kh, 0), max(kf, 0)


def solve_schedule(model, adapter, target: float, schedule: str = "log_increase", r0_fraction: float = 0.25,
                   gqa: str = "kv_group", head_scale: float = 1.0, uniform_heads: bool = False) -> dict:
    """Per-layer ratios and removal counts whose realised parameter reduction over the decoder layers
    equals `target` after rounding (bisection on r_last, then the FFN absorbs the head residual).
    `head_scale` removes heads at that multiple of each layer's ratio (0: FFN only).
    `uniform_heads` (`servable: vllm`): every layer removes the same number of head units, the mean
    (rounded) of what the schedule alone would remove; the FFN widths follow the schedule and absorb
    the difference. Returns {ratios, heads (units removed per layer), ffn (channels removed), r_last,
    realised}."""
    check_ratio(target)
    units = unit_counts(model, adapter, gqa)
    L = len(units)
    total = sum(u["total"] for u in units if u)
    goal = target * total
    fixed = None
    if uniform_heads and schedule != "uniform":
        free = solve_schedule(model, adapter, target, schedule, r0_fraction, gqa, head_scale)["heads"]
        hs = [h for h, u in zip(free, units) if u]
        fixed = int(math.floor(sum(hs) / max(len(hs), 1) + 0.5))

    def count(r_last):
        rs = schedule_ratios(schedule, r_last, L, r0_fraction)
        kh, kf, rem = [], [], 0
        for u, r in zip(units, rs):
            if u is None:
                kh.append(0), kf.append(0)
                continue
            a, b = _removed(u, min(r, 1.0), head_scale)
            if fixed is not None:
                a = min(fixed, (u["per_group"] or u["units"]) - 1)
            kh.append(a), kf.append(b)
            rem += a * u["unit_params"] + b * u["ch_params"]
        return rs, kh, kf, rem

    if target == 0:
        rs, kh, kf, rem = count(0.0)
        return dict(ratios=rs, heads=kh, ffn=kf, r_last=0.0, realised=0.0)
    lo, hi = 0.0, 1.0
    while count(hi)[3] < goal and hi < 64:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        (lo, hi) = (mid, hi) if count(mid)[3] < goal else (lo, mid)
    cand = [count(lo), count(hi)]
    rs, kh, kf, rem = min(cand, key=lambda c: abs(c[3] - goal))
    r_last = lo if rem == cand[0][3] else hi
    # the FFN absorbs the residual left by whole heads / KV groups
    ch = next(u["ch_params"] for u in units if u)
    n = int(math.floor((goal - rem) / ch + 0.5))
    order = sorted((i for i, u in enumerate(units) if u), key=lambda i: -rs[i])
    if schedule == "uniform":  # keep every layer the same shape (a stock-loadable checkpoint)
        per = int(math.floor(n / max(len(order), 1) + 0.5))
        for i in order:
            kf[i] = min(max(kf[i] + per, 0), units[i]["ffn"] - 1)
        n = 0
    step = 1 if n > 0 else -1
    guard = 0
    while n != 0 and guard < 100 * L:
        moved = False
        for i in order:
            if n == 0:
                break
            new = kf[i] + step
            if 0 <= new <= units[i]["ffn"] - 1:
                kf[i] = new
                n -= step
                moved = True
        guard += 1
        if not moved:
            break
    rem = sum(kh[i] * u["unit_params"] + kf[i] * u["ch_params"] for i, u in enumerate(units) if u)
    return dict(ratios=rs, heads=kh, ffn=kf, r_last=r_last, realised=rem / total)
