"""From scores and a ratio to a PrunePlan: per-layer ratio schedules (uniform, log / linear increase
/ decrease), the parameter-budget solver SlimGPT and FLAP share, and lowest-score removal.

`ratio` means one thing for every method: the fraction of **decoder-layer parameters** removed
(embeddings, final norm and LM head are never pruned). Each method converts it to its own units;
for heads and FFN channels `removal_counts` does it per layer: whole heads (or KV groups) are
rounded from the layer's ratio, then the FFN channels absorb the head rounding so that the layer
loses its share of parameters; a heads-only or FFN-only method removes as many of its units as
hold that share. The plan records the realised per-layer fractions (`per_layer_ratio`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .adapters import Adapter
from .errors import ConfigError
from .metrics import attention_block_params
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


def keep_heads(score: torch.Tensor, n_q: int, n_kv: int, r: float, gqa: str, layer: int,
               k: int | None = None) -> tuple[list[int], list[int]]:
    """Kept (query heads, KV heads) from per-query-head scores (lowest removed): round(n * r) units,
    or exactly `k` units (KV groups, or query heads per group) when given."""
    rep = n_q // n_kv
    if gqa == "kv_group":
        g = score.double().view(n_kv, rep).sum(1)
        k = n_remove(n_kv, r, "ratio", layer, "KV group") if k is None else k
        drop = set(torch.argsort(g, stable=True)[:k].tolist())
        kv = [i for i in range(n_kv) if i not in drop]
        return [g_ * rep + j for g_ in kv for j in range(rep)], kv
    if gqa == "per_group":
        k = n_remove(rep, r, "ratio", layer, "query head per KV group") if k is None else k
        keep_q = []
        for g_ in range(n_kv):
            s = score[g_ * rep:(g_ + 1) * rep].double()
            drop = set(torch.argsort(s, stable=True)[:k].tolist())
            keep_q += [g_ * rep + j for j in range(rep) if j not in drop]
        return keep_q, list(range(n_kv))
    raise ConfigError("method.settings.gqa", gqa, "kv_group or per_group")


def keep_channels(score: torch.Tensor, r: float, layer: int, k: int | None = None) -> list[int]:
    n = score.numel()
    k = n_remove(n, r, "ratio", layer, "FFN channel") if k is None else k
    drop = set(torch.argsort(score.double(), stable=True)[:k].tolist())
    return [i for i in range(n) if i not in drop]


def _units(model: nn.Module, adapter: Adapter, layer: nn.Module, gqa: str) -> dict:
    """One decoder layer's pruning units: its parameters, its head units (KV groups, or query heads per
    group for `per_group`) and the parameters one unit holds, its FFN channels and the parameters of one."""
    s = adapter.layer_shape(model, layer)
    hidden = adapter.proj(layer, adapter.o).out_features
    rep = max(s.n_heads // max(s.n_kv_heads, 1), 1)
    per_head = 2 * s.head_dim * hidden  # q rows + o columns
    if gqa == "per_group" and rep > 1:  # one query head in every group
        n_units, unit_params, unit, group = rep, s.n_kv_heads * per_head, "query head per KV group", rep
    else:  # a KV group: its query heads + k and v rows
        n_units, unit_params, unit, group = s.n_kv_heads, rep * per_head + 2 * s.head_dim * hidden, "KV group", None
    return dict(total=sum(p.numel() for p in layer.parameters()), n_units=n_units, unit_params=unit_params,
                unit=unit, kv_groups=s.n_kv_heads, group_size=group, ffn=s.ffn,
                ch_params=(len(adapter.mlp_in) + 1) * hidden)


def unit_sizes(model: nn.Module, adapter: Adapter, gqa: str = "kv_group") -> list[dict]:
    """`_units` of every decoder layer (what `removal_counts` converts a parameter fraction into)."""
    return [_units(model, adapter, layer, gqa) for layer in adapter.layers(model)]


def _too_many(r: float, k: int, n: int, unit: str, layer: int, share: float) -> ConfigError:
    return ConfigError("ratio", r, f"a ratio that keeps at least one {unit} in layer {layer} (it has {n}, {k} would go; "
                                   f"accepted: ratio < {(n - 0.5) * share:.3f})")


def removal_counts(sizes: list[dict], per_layer: list[float], targets: tuple[str, ...]) -> list[tuple[int, int]]:
    """(head units, FFN channels) to remove in every layer so that layer i loses the fraction
    per_layer[i] of its parameters: heads rounded from the ratio, then the FFN absorbs the rest."""
    out = []
    for i, (u, r) in enumerate(zip(sizes, per_layer)):
        goal = r * u["total"]
        kh = kf = 0
        if r > 0 and "heads" in targets:
            kh = int(math.floor((u["n_units"] * r if "ffn" in targets else goal / u["unit_params"]) + 0.5))
            if kh >= u["n_units"]:
                raise _too_many(r, kh, u["n_units"], u["unit"], i,
                                1.0 / u["n_units"] if "ffn" in targets else u["unit_params"] / u["total"])
        if r > 0 and "ffn" in targets:
            kf = int(math.floor((goal - kh * u["unit_params"]) / u["ch_params"] + 0.5))
            if kf >= u["ffn"]:
                if "heads" in targets:  # the heads leave too much to the FFN: saturate it
                    kf = u["ffn"] - 1
                else:
                    raise _too_many(r, kf, u["ffn"], "FFN channel", i, u["ch_params"] / u["total"])
            kf = max(kf, 0)
        out.append((kh, kf))
    return out


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
    """Remove the lowest-scoring units in every layer; layer i loses the fraction per_layer[i]
    (default: `ratio`) of its parameters (`removal_counts`). `uniform_heads` (the `servable: vllm`
    constraint): every layer loses the head units the target ratio gives, the FFN absorbs the rest."""
    check_ratio(ratio)
    shapes = adapter.shapes(model)
    ratios = per_layer if per_layer is not None else [ratio] * len(shapes)
    sizes = unit_sizes(model, adapter, gqa)
    scored = tuple(t for t in targets if t in ("heads", "ffn") and any(k.startswith(f"{t}.") for k in scores))
    counts = removal_counts(sizes, ratios, scored)
    if uniform_heads and "heads" in scored and "ffn" in scored:
        kh_u = [c[0] for c in removal_counts(sizes, [ratio] * len(shapes), scored)]
        counts = [(kh, max(0, min(u["ffn"] - 1, int(math.floor((r * u["total"] - kh * u["unit_params"])
                                                                   / u["ch_params"] + 0.5)))))
                  for kh, u, r in zip(kh_u, sizes, ratios)]
    lps, realised = [], []
    for i, s in enumerate(shapes):
        lp = LayerPlan(i)
        kh, kf = counts[i]
        if "heads" in targets and f"heads.{i}" in scores and kh > 0:
            lp.heads, lp.kv_heads = keep_heads(scores[f"heads.{i}"], s.n_heads, s.n_kv_heads, ratios[i], gqa, i, k=kh)
        else:
            kh = 0
        if "ffn" in targets and f"ffn.{i}" in scores and kf > 0:
            lp.ffn = keep_channels(scores[f"ffn.{i}"], ratios[i], i, k=kf)
        else:
            kf = 0
        u = sizes[i]
        realised.append((kh * u["unit_params"] + kf * u["ch_params"]) / u["total"] if u["total"] else 0.0)
        lps.append(lp)
    plan = PrunePlan(method=method, settings=settings or {}, layers=lps, target_ratio=ratio,
                     per_layer_ratio=realised)
    from .metrics import plan_params

    plan.params_before, plan.params_after = plan_params(model, plan)
    return plan


def ffn_unit_ratio(model: nn.Module, adapter: Adapter, ratio: float) -> float:
    """The fraction of FFN channels whose removal takes away `ratio` of the decoder-layer parameters
    (FFN-only methods with a global allocation)."""
    sizes = unit_sizes(model, adapter)
    total = sum(u["total"] for u in sizes)
    ffn = sum(u["ffn"] * u["ch_params"] for u in sizes)
    r = ratio * total / ffn if ffn else 0.0
    if r >= 1.0:
        raise ConfigError("ratio", ratio, f"a ratio < {ffn / total:.3f} (the FFN holds that share of the "
                                          "decoder-layer parameters; removing more would empty it)")
    return r


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
    """Per layer, `_units` as the schedule solver counts them: KV groups (`units`), params per head
    unit, query heads per group when a unit is one head in every group (`per_group`), FFN size, params
    per channel; None for a layer that is not a decoder layer."""
    out = []
    for layer in adapter.layers(model):
        if adapter.layer_shape(model, layer).kind != "decoder":
            out.append(None)
            continue
        u = _units(model, adapter, layer, gqa)
        out.append(dict(units=u["kv_groups"], unit_params=u["unit_params"], per_group=u["group_size"], ffn=u["ffn"],
                        ch_params=u["ch_params"], total=u["total"],
                        attn_block=attention_block_params(adapter, layer) if adapter.mlp_path else None))
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


def sizes_plan(model, adapter, sched: dict, gqa: str, method: str, settings: dict, ratio: float) -> PrunePlan:
    """A plan with the kept sizes of a solved schedule (lowest indices dropped: only sizes are meaningful)."""
    lps = []
    for i, layer in enumerate(adapter.layers(model)):
        lp, shape = LayerPlan(i), adapter.layer_shape(model, layer)
        kh, kf = sched["heads"][i], sched["ffn"][i]
        if shape.kind == "decoder":
            rep = shape.n_heads // shape.n_kv_heads
            if kh and (gqa == "kv_group" or rep == 1):
                lp.kv_heads = list(range(kh, shape.n_kv_heads))
                lp.heads = [g * rep + j for g in lp.kv_heads for j in range(rep)]
            elif kh:
                lp.heads = [g * rep + j for g in range(shape.n_kv_heads) for j in range(kh, rep)]
                lp.kv_heads = list(range(shape.n_kv_heads))
            if kf:
                lp.ffn = list(range(kf, shape.ffn))
        lps.append(lp)
    plan = PrunePlan(method=method, settings=settings, layers=lps, target_ratio=ratio,
                     per_layer_ratio=[float(r) for r in sched["ratios"]])
    from .metrics import plan_params

    plan.params_before, plan.params_after = plan_params(model, plan)
    return plan
