"""`schedule: search` — per-layer head / FFN widths found under a budget instead of a fixed profile.

Why this shape (the literature):

* EvoPress (Sieberling et al., ICML 2025) and DarwinLM (Tang et al., 2025) show that per-layer
  compression levels chosen by *error monotonicity* assumptions (sum of layer-wise errors) can be
  beaten by an evolutionary search whose fitness is the KL of the candidate's logits to the dense
  model's; both build a *database* of per-layer compressed variants once and search over it.
* Puzzletron / Puzzle (Bercovich et al., 2024) scores every per-block variant once (its "replace-1"
  block quality, KL of the model with only that block replaced), then solves a mixed-integer program
  that maximises summed quality under a memory / throughput budget — exactly, in seconds.
* Minitron (Muralidharan et al., 2024) ranks width/depth axes by activation importance and finds that
  width pruning of heads / FFN with a light search beats depth pruning at moderate ratios.

We take Puzzletron's recipe, with SlimGPT's OBS maths for the per-variant tables, because the tables are
almost free: (a) **tables** — one pass over the dense model collects each layer's `o_proj` / `down_proj`
input Hessians; the greedy structured OBS of SlimGPT (§3.2–3.3) then gives the layer's reconstruction
error at *every* FFN width (the sequential OBS error of each removed column, cumulated) and at every head
count. Layer errors are not comparable across layers, so each layer's two curves are **calibrated
against the final output**: the layer's sub-block is replaced by its OBS-pruned version at one reference
width (heads: one unit; FFN: a quarter of the channels), the whole model is run on `kl_blocks`
calibration blocks, and the KL to the dense logits divided by the layer error at that width is the
layer's sensitivity (Puzzletron's replace-1 KL, used as the slope of the OBS curve); the costs are then
"estimated KL to dense" and add over sub-blocks (the monotone / additive assumption EvoPress criticises;
the evolutionary refinement that removes it is not implemented, see `SearchSettings`). `sensitivity:
residual` is the cheaper alternative: the error relative to the residual stream's energy at the layer.
(b) **solve** — a knapsack over integer parameter (or byte) units, by dynamic programming, picks one
(heads, FFN width) option per layer minimising the summed cost while removing at least the budget; a
fix-up moves single FFN channels (or width multiples) so the budget is met exactly (to one channel,
or one multiple). The tables are one artifact reused by every ratio and budget; only the solve is redone.

Budgets: `ratio` (fraction of decoder-layer parameters removed, as everywhere), `params` (parameters
left, whole model) or `memory_mb` at `seq_len` x `batch`: the serving footprint
weights x bytes + KV cache = 2 · batch · seq_len · Σ_layers kv_heads · head_dim · bytes (`serving_bytes`).
Constraints: `servable: vllm` (one query-head count in every layer), FFN and head width multiples, a
minimum width per layer, and optionally whole sub-blocks (`drop_blocks`, joint depth and width as in
Minitron and Puzzletron): an attention-free layer (its table cost at every head unit removed; it becomes
its FFN as a residual layer), an FFN-free layer (zero-width MLP) or, both at once, a removed layer.
SlimGPT zeroes such a block's output projection before the next layer's Hessians; the score-then-select
methods keep no unit of it; FLAP refuses it (its compensation bias would have nowhere to go). The vLLM
export writes them as DeciLM `no_op` blocks.
"""

from __future__ import annotations

import importlib
import math
import time
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .errors import ConfigError, validated


class SearchSettings(BaseModel):
    """Settings of `schedule: search` (the run spec's `search:` block)."""

    model_config = ConfigDict(extra="forbid")
    ffn_multiple: int = Field(1, ge=1, description="every kept FFN width is a multiple of this")
    head_multiple: int = Field(1, ge=1, description="every layer's kept query-head count is a multiple of this")
    min_ffn: int = Field(1, ge=1, description="fewest FFN channels a layer keeps (unless FFN-free)")
    min_heads: int = Field(1, ge=1, description="fewest query heads a layer keeps (unless attention-free)")
    drop_blocks: bool = Field(False, description="allow attention-free / FFN-free layers (joint depth and width)")
    # auto: residual for OBS-compensated tables (SlimGPT), kl for zeroing tables (FLAP, Wanda-sp, LLM-Rank and
    # the other score-then-select methods). Out of domain (benchmarks/RESULTS.md, issue 21) residual beat kl for
    # SlimGPT on every seed at 20 % and 30 % (at ~1.2 x one prune instead of ~4.7 x), while for the zeroing
    # methods kl was far better (Wanda-sp 74.6 vs 102.7, LLM-Rank 69.8 vs 122.7 at 20 %, seed 42)
    sensitivity: Literal["auto", "kl", "residual"] = Field(
        "auto", description="auto (residual with OBS compensation, else kl), residual (layer error relative to "
                            "the residual stream's energy) or kl (layer error calibrated by the KL of a "
                            "one-layer prune to dense)")
    kl_blocks: int = Field(4, ge=1, description="calibration blocks for the KL calibration")
    ffn_batch: int = Field(128, ge=1, description="FFN columns per OBS batch while building the tables")
    grid: int = Field(16, ge=1, description="FFN channels per knapsack unit (coarse solve before the exact fix-up)")


class Budget(BaseModel):
    """`budget: {memory_mb, seq_len, batch, bytes_per_param}`: the serving memory the result must fit."""

    model_config = ConfigDict(extra="forbid")
    memory_mb: float = Field(..., gt=0, description="weights + KV cache, in MiB")
    seq_len: int = Field(2048, ge=1, description="tokens of KV cache per sequence")
    batch: int = Field(1, ge=1, description="sequences served at once")
    bytes_per_param: int = Field(2, ge=1, le=8, description="bytes per weight and per KV entry (2: bf16)")


def resolved_sensitivity(st: SearchSettings, compensate: bool) -> str:
    """The sensitivity `build_tables` uses: `auto` is residual for OBS-compensated curves, kl otherwise."""
    if st.sensitivity != "auto":
        return st.sensitivity
    return "residual" if compensate else "kl"


def parse_search(raw: dict | None) -> SearchSettings:
    return validated(SearchSettings, raw, "search")


def parse_budget(raw: dict | None) -> Budget | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError("budget", raw, "a mapping {memory_mb, seq_len, batch, bytes_per_param}")
    return validated(Budget, raw, "budget")


# -- (b) the budget solve --------------------------------------------------------------------------


def serving_bytes(n_params: int, kv_heads: list[int], head_dim: int, budget: Budget) -> int:
    """Weights x bytes + KV cache (K and V, every layer, `batch` sequences of `seq_len` tokens)."""
    b = budget.bytes_per_param
    return n_params * b + 2 * budget.batch * budget.seq_len * sum(kv_heads) * head_dim * b


def _layer_options(u: dict, shape, st: SearchSettings, gqa: str, q_fixed: int | None, targets=("heads", "ffn"),
                   attn_free_ok: bool = True):
    """[(kh, kept_q, kv_removed)] and [kf] allowed in a layer by the constraints. `q_fixed` (servable: vllm):
    the query heads every layer with attention keeps; attention-free layers (drop_blocks) stay allowed
    where `attn_free_ok` (not the first layer: vLLM's DeciLM starts its residual stream at an attention)."""
    rep = shape.n_heads // shape.n_kv_heads
    per_group = gqa == "per_group" and rep > 1
    n_units = rep if per_group else shape.n_kv_heads
    heads = []
    for kh in range(n_units + 1 if "heads" in targets else 1):
        kept_q = shape.n_kv_heads * (rep - kh) if per_group else (shape.n_kv_heads - kh) * rep
        kv_rm = (0 if per_group else kh) if kh < n_units else shape.n_kv_heads
        if kh == n_units:
            if not st.drop_blocks or not attn_free_ok or u.get("attn_block") is None:
                continue
        elif kept_q < st.min_heads or kept_q % st.head_multiple:
            continue
        elif q_fixed is not None and kept_q != q_fixed:
            continue
        heads.append((kh, kept_q, kv_rm))
    ffn = [kf for kf in range(shape.ffn + 1 if "ffn" in targets else 1)
           if kf == 0 or (kf == shape.ffn and st.drop_blocks)
           or (kf < shape.ffn and shape.ffn - kf >= st.min_ffn and (shape.ffn - kf) % st.ffn_multiple == 0)]
    return heads, ffn


def solve(model, adapter, tables: dict[str, torch.Tensor], ratio: float | None = None, gqa: str = "per_group",
          settings: SearchSettings | None = None, budget: Budget | None = None, servable: str = "none",
          targets: tuple[str, ...] = ("heads", "ffn")) -> dict:
    """The per-layer (head units, FFN channels) removed that minimise the summed table cost while the
    decoder layers lose `ratio` of their parameters (nearest to one FFN channel / multiple) or, with
    `budget`, the serving memory fits `budget.memory_mb` (as close under it as one channel / multiple).
    Returns solve_schedule's keys {ratios, heads, ffn, realised} plus {cost, params_after, memory_bytes,
    kept_q, drop_attn, drop_ffn, solve_seconds}. Infeasible: a one-line ConfigError."""
    from .select import check_ratio, unit_counts
    from .surgery import count_params

    t0 = time.perf_counter()
    st = settings or SearchSettings()
    units = unit_counts(model, adapter, gqa)
    layers = adapter.layers(model)
    shapes = [adapter.layer_shape(model, layer) for layer in layers]
    dec = [i for i, u in enumerate(units) if u]
    total = sum(units[i]["total"] for i in dec)
    n_all = count_params(model)
    hd = adapter.head_dim(model)
    ch = units[dec[0]]["ch_params"]
    if budget is None:
        ratio = check_ratio(0.0 if ratio is None else ratio)
        bpp, kvb, goal = 1, 0, ratio * total
        field, value = "ratio", ratio
    else:
        bpp = budget.bytes_per_param
        kvb = 2 * budget.batch * budget.seq_len * hd * bpp  # bytes of one KV head's cache
        kv0 = [shapes[i].n_kv_heads if units[i] else 0 for i in range(len(units))]
        goal = serving_bytes(n_all, kv0, hd, budget) - budget.memory_mb * 2**20
        field, value = "budget.memory_mb", budget.memory_mb
    step_w = ch * bpp  # bytes (params) of one FFN channel
    grid = max(st.ffn_multiple, st.ffn_multiple * math.ceil(st.grid / st.ffn_multiple))
    U = grid * step_w
    G = max(0, math.ceil(goal / U - 1e-9))

    def cost_of(i, kh, kf):
        return float(tables[f"attn.{i}"][kh]) + float(tables[f"ffn.{i}"][kf])

    first = max(0, G - len(dec)) if st.drop_blocks else G

    def run_dp(q_fixed):
        """[(cost, picks)] of the cheapest path to every end state from `first` grid units on, cheapest first.
        States are kept exactly up to G + the largest option (not clamped at G): with whole blocks an
        overshoot the fix-up cannot give back (an FFN-free layer returns no single channel) yields to
        another state, and states a little under G (each option's weight is floored) can be topped up."""
        opts_all = []
        for i in dec:
            u = units[i]
            heads, ffn = _layer_options(u, shapes[i], st, gqa, q_fixed, targets,
                                        attn_free_ok=servable != "vllm" or i != dec[0])
            if not heads or not ffn:
                return []
            # the coarse grid: FFN removals whose kept width is a multiple of `grid`, plus the extremes
            coarse = sorted({kf for kf in ffn if (shapes[i].ffn - kf) % grid == 0 or kf in (ffn[0], ffn[-1])})
            opts = []
            for kh, _q, kv_rm in heads:
                for kf in coarse:
                    saved = _saved_params(u, shapes[i], gqa, kh, kf)
                    w = saved * bpp + kv_rm * kvb
                    opts.append((int(w // U), cost_of(i, kh, kf), kh, kf))
            opts_all.append(opts)
        if sum(max(o[0] for o in opts) for opts in opts_all) < first:
            return []
        top = G + max(o[0] for opts in opts_all for o in opts)  # the last state: "top or more"
        dp = np.full(top + 1, np.inf)
        dp[0] = 0.0
        back = []
        idx = np.arange(top + 1)
        for opts in opts_all:
            new = np.full(top + 1, np.inf)
            ch_o = np.full(top + 1, -1, dtype=np.int32)
            src = np.zeros(top + 1, dtype=np.int64)
            for k, (w, c, _, _) in enumerate(opts):
                cand = np.full(top + 1, np.inf)
                s = np.zeros(top + 1, dtype=np.int64)
                if w == 0:
                    cand[:] = dp + c
                    s[:] = idx
                else:
                    if w <= top:
                        cand[w:top] = dp[:top - w] + c
                        s[w:top] = idx[:top - w]
                    lo = max(0, top - w)
                    j = int(np.argmin(dp[lo:])) + lo
                    cand[top] = dp[j] + c
                    s[top] = j
                better = cand < new
                new[better], ch_o[better], src[better] = cand[better], k, s[better]
            back.append((ch_o, src))
            dp = new
        out = []
        for end in sorted((b for b in range(first, top + 1) if np.isfinite(dp[b])), key=lambda b: (dp[b], b)):
            pick, b = [], end
            for (ch_o, src), opts in zip(reversed(back), reversed(opts_all)):
                o = opts[int(ch_o[b])]
                pick.append((o[2], o[3]))
                b = int(src[b])
            out.append((float(dp[end]), pick[::-1]))
        return out

    def saved_bytes(kh, kf):
        s = 0
        for i in dec:
            s += _saved_params(units[i], shapes[i], gqa, kh[i], kf[i]) * bpp
            s += _kv_removed(shapes[i], gqa, kh[i]) * kvb
        return s

    m = st.ffn_multiple

    def fix_up(kh, kf):
        """The exact fix-up with single FFN moves of `ffn_multiple` channels, cheapest marginal cost first;
        None when it cannot meet the budget from this coarse solution."""
        kf = dict(kf)
        for _ in range(100000):
            r = saved_bytes(kh, kf) - goal
            if budget is None:
                if abs(r) <= m * step_w / 2:
                    break
                sign = 1 if r < 0 else -1  # remove more (+) or give back (−)
            else:
                if r < 0:
                    sign = 1
                elif r >= m * step_w:
                    sign = -1
                else:
                    break
            best_i, best_d = None, math.inf
            for i in dec:
                nk = kf[i] + sign * m
                if "ffn" not in targets or not _ffn_ok(shapes[i].ffn, nk, st):
                    continue
                d = sign * (cost_of(i, kh[i], nk) - cost_of(i, kh[i], kf[i]))
                if d < best_d:
                    best_i, best_d = i, d
            if best_i is None:
                break
            kf[best_i] += sign * m
        saved = saved_bytes(kh, kf)
        if (budget is None and abs(saved - goal) > m * step_w) or (budget is not None and saved < goal):
            return None
        return kf

    if servable == "vllm":
        qs = sorted({q for i in dec for _, q, _ in _layer_options(units[i], shapes[i], st, gqa, None, targets)[0] if q})
        coarse = sorted((r for q in qs for r in run_dp(q)), key=lambda r: r[0])
    else:
        coarse = run_dp(None)
    best = None  # without whole blocks: the cheapest coarse solution (its fix-up always works from >= G)
    for _cost, picks in coarse[:256]:  # with them: the cheapest after an exact fix-up
        h = {i: p[0] for i, p in zip(dec, picks)}
        f = fix_up(h, {i: p[1] for i, p in zip(dec, picks)})
        if f is None:
            continue
        c = sum(cost_of(i, h[i], f[i]) for i in dec)
        if best is None or c < best[0]:
            best = (c, h, f)
        if not st.drop_blocks:
            break
    if best is not None:
        _c, kh, kf = best
    else:
        raise ConfigError(field, value, _max_msg(units, shapes, dec, st, gqa, bpp, kvb, total, budget, n_all, hd,
                                                 servable))
    heads = [kh.get(i, 0) for i in range(len(units))]
    ffn = [kf.get(i, 0) for i in range(len(units))]
    removed = sum(_saved_params(units[i], shapes[i], gqa, kh[i], kf[i]) for i in dec)
    kv = [shapes[i].n_kv_heads - _kv_removed(shapes[i], gqa, kh[i]) if units[i] else 0 for i in range(len(units))]
    mem_budget = budget or Budget(memory_mb=1, seq_len=2048, batch=1)
    return dict(
        ratios=[(_saved_params(units[i], shapes[i], gqa, kh[i], kf[i]) / units[i]["total"]) if units[i] else 0.0
                for i in range(len(units))],
        heads=heads, ffn=ffn, r_last=None, realised=removed / total, cost=sum(cost_of(i, kh[i], kf[i]) for i in dec),
        params_after=n_all - removed, memory_bytes=serving_bytes(n_all - removed, kv, hd, mem_budget),
        memory_at={"seq_len": mem_budget.seq_len, "batch": mem_budget.batch, "bytes_per_param": mem_budget.bytes_per_param},
        kept_q=[_kept_q(shapes[i], gqa, kh[i]) if units[i] else 0 for i in range(len(units))],
        kept_kv=kv, kept_ffn=[shapes[i].ffn - kf[i] if units[i] else 0 for i in range(len(units))],
        drop_attn=[i for i in dec if kh[i] == _n_units(shapes[i], gqa)],
        drop_ffn=[i for i in dec if kf[i] == shapes[i].ffn], solve_seconds=time.perf_counter() - t0)


def _n_units(shape, gqa):
    rep = shape.n_heads // shape.n_kv_heads
    return rep if gqa == "per_group" and rep > 1 else shape.n_kv_heads


def _kept_q(shape, gqa, kh):
    rep = shape.n_heads // shape.n_kv_heads
    return shape.n_kv_heads * (rep - kh) if gqa == "per_group" and rep > 1 else (shape.n_kv_heads - kh) * rep


def _kv_removed(shape, gqa, kh):
    if kh == _n_units(shape, gqa):
        return shape.n_kv_heads
    rep = shape.n_heads // shape.n_kv_heads
    return 0 if gqa == "per_group" and rep > 1 else kh


def _saved_params(u, shape, gqa, kh, kf):
    """Parameters removed by kh head units and kf FFN channels; a whole block also loses its norm."""
    if kh == _n_units(shape, gqa) and kf == shape.ffn:  # both sub-blocks: the layer goes
        return u["total"]
    s = u["attn_block"] if kh == _n_units(shape, gqa) else kh * u["unit_params"]  # attention-free: its norm too
    return s + kf * u["ch_params"]


def _ffn_ok(n, kf, st):
    return 0 <= kf <= n and ((kf == n and st.drop_blocks) or (kf < n and n - kf >= st.min_ffn
                                                               and (n - kf) % st.ffn_multiple == 0))


def _max_msg(units, shapes, dec, st, gqa, bpp, kvb, total, budget, n_all, hd, servable):
    mx = 0
    for i in dec:
        heads, ffn = _layer_options(units[i], shapes[i], st, gqa, None)
        if not heads or not ffn:
            return "a budget the constraints allow (no width of some layer satisfies min_heads/head_multiple " \
                   "and min_ffn/ffn_multiple)"
        mx += max(_saved_params(units[i], shapes[i], gqa, kh, kf) * bpp + kv * kvb for kh, _, kv in heads for kf in ffn)
    gaps = "; whole blocks are coarse, so not every ratio below it is met to one FFN channel" if st.drop_blocks else ""
    if budget is None:
        return f"a ratio <= {mx / total:.4f} under these constraints (servable {servable}, min_ffn {st.min_ffn}, " \
               f"min_heads {st.min_heads}, ffn_multiple {st.ffn_multiple}, head_multiple {st.head_multiple}, " \
               f"drop_blocks {st.drop_blocks}){gaps}"
    kv0 = [shapes[i].n_kv_heads if units[i] else 0 for i in range(len(units))]
    least = serving_bytes(n_all, kv0, hd, budget) - mx
    return f"memory_mb >= {least / 2**20:.1f} at seq_len {budget.seq_len}, batch {budget.batch} under these constraints{gaps}"


def search_schedule(model, adapter, calib_ids, ratio, gqa="per_group", percdamp=0.01, compensate=True,
                    head_score="grouped", settings: SearchSettings | None = None, budget: Budget | None = None,
                    servable="none", device="cpu", batch_size=8, tables=None, whole_blocks_ok=True) -> dict:
    """`build_tables` (unless given) then `solve`; the schedule records the search's cost.
    `whole_blocks_ok=False`: a plan with attention-free / FFN-free layers is a ConfigError (the method
    cannot apply it)."""
    t0 = time.perf_counter()
    hit = tables is not None
    if tables is None:  # imported by name: the pipeline passes the layer_tables artifact, whose key holds that code
        build_tables = importlib.import_module("pruning_core.search_tables").build_tables
        tables = build_tables(model, adapter, calib_ids, gqa, percdamp, compensate, head_score, settings,
                              device=device, batch_size=batch_size)
    sched = solve(model, adapter, tables, ratio, gqa, settings, budget, servable)
    if not whole_blocks_ok and (sched["drop_attn"] or sched["drop_ffn"]):
        raise ConfigError("search.drop_blocks", True, "false for this method (its prune does not remove whole "
                                                       "attention / FFN blocks)")
    sched["search"] = {"tables_seconds": float(tables["seconds"][0]), "tables_reused": hit,
                       "solve_seconds": sched["solve_seconds"], "seconds": time.perf_counter() - t0,
                       "candidates_scored": 0}
    return sched


def searched_notes(sched: dict) -> dict:
    """What a plan records of its search (report, plan view): cost, widths, budget figures, and the per-layer
    fractions removed next to those of the method's fixed profile at the same realised ratio."""
    return {**sched["search"], **{k: sched.get(k) for k in (
        "cost", "kept_q", "kept_kv", "kept_ffn", "params_after", "memory_bytes", "memory_at", "drop_attn", "drop_ffn",
        "ratios", "realised", "profile")}}


def with_profile(model, adapter, sched: dict, profile: str, gqa: str, **kw) -> dict:
    """`sched` plus {"profile": {name, ratios}}: the fixed schedule's realised per-layer fractions at the
    searched plan's realised ratio (what the report plots the search against); None when unreachable."""
    from .select import solve_schedule, unit_counts

    try:
        p = solve_schedule(model, adapter, sched["realised"], profile, gqa=gqa, **kw)
    except ConfigError:
        sched["profile"] = None
        return sched
    ratios = [((p["heads"][i] * u["unit_params"] + p["ffn"][i] * u["ch_params"]) / u["total"]) if u else 0.0
              for i, u in enumerate(unit_counts(model, adapter, gqa))]
    sched["profile"] = {"name": profile, "ratios": ratios}
    return sched


def needs_tables(method: str) -> ConfigError:
    return ConfigError("schedule", "search", f"a run through the pipeline for {method!r} (its per-layer tables are the "
                                             "layer_tables step), or a fixed schedule")


def counts_plan(model, adapter, scores: dict, sched: dict, method: str, settings: dict, gqa: str, ratio: float):
    """Keep each layer's highest-scoring units, in the numbers a solved schedule removes (`sched["heads"]`
    head units — whole KV groups, or with `per_group` the same number of query heads in every group —
    and `sched["ffn"]` channels): score-then-select methods under `schedule: search`."""
    from .metrics import plan_params
    from .plan import LayerPlan, PrunePlan

    lps = []
    for i, layer in enumerate(adapter.layers(model)):
        s = adapter.layer_shape(model, layer)
        lp = LayerPlan(i)
        if s.kind != "decoder":
            lps.append(lp)
            continue
        rep = s.n_heads // s.n_kv_heads
        kh, kf = sched["heads"][i], sched["ffn"][i]
        no_attn, no_ffn = i in sched.get("drop_attn", ()), i in sched.get("drop_ffn", ())
        if no_attn and no_ffn:  # drop_blocks: both sub-blocks go, so does the layer
            lp.keep = False
        elif no_attn:  # attention-free: surgery keeps the FFN as a residual layer
            lp.heads, lp.kv_heads = [], []
        elif kh and f"heads.{i}" in scores:
            if gqa == "per_group" and rep > 1:
                g = scores[f"heads.{i}"].double().view(s.n_kv_heads, rep)
                keep = torch.argsort(g, dim=1, descending=True, stable=True)[:, : rep - kh]
                lp.heads = sorted(k * rep + int(j) for k in range(s.n_kv_heads) for j in keep[k])
                lp.kv_heads = list(range(s.n_kv_heads))
            else:
                g = scores[f"heads.{i}"].double().view(s.n_kv_heads, rep).sum(1)
                lp.kv_heads = sorted(torch.argsort(g, descending=True, stable=True)[: s.n_kv_heads - kh].tolist())
                lp.heads = [k * rep + j for k in lp.kv_heads for j in range(rep)]
        if no_ffn and not no_attn:  # FFN-free
            lp.ffn = []
        elif kf and f"ffn.{i}" in scores and lp.keep:
            lp.ffn = sorted(torch.argsort(scores[f"ffn.{i}"].double(), descending=True, stable=True)[: s.ffn - kf].tolist())
        lps.append(lp)
    plan = PrunePlan(method=method, settings=settings, layers=lps, target_ratio=ratio,
                     per_layer_ratio=[float(r) for r in sched["ratios"]])
    plan.params_before, plan.params_after = plan_params(model, plan)
    plan.notes = {"search": searched_notes(sched)}
    return plan


def select_searched(model, adapter, scores: dict, ratio: float, st, method: str, tables: dict):
    """A score-then-select method (wanda, l1, l2, activation, random; llm-rank and mpr for FFN channels only,
    their settings' `targets`) under `schedule: search`: solve over the tables, then keep the
    highest-scoring units in the searched numbers."""
    t0 = time.perf_counter()
    targets = tuple(getattr(st, "targets", ("heads", "ffn")))
    sched = solve(model, adapter, tables, ratio, st.gqa, st.search, st.budget, st.servable, targets)
    sched["search"] = {"tables_seconds": float(tables["seconds"][0]), "tables_reused": True,
                       "solve_seconds": sched["solve_seconds"], "seconds": time.perf_counter() - t0,
                       "candidates_scored": 0}
    with_profile(model, adapter, sched, "uniform", st.gqa)  # the baselines' default profile
    return counts_plan(model, adapter, scores, sched, method, st.model_dump(), st.gqa, ratio)
