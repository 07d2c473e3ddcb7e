"""SlimGPT: layer-wise structured Optimal Brain Surgeon for attention heads and FFN channels.

Ling, Wang, Yan, Liu, "SlimGPT: Layer-wise Structured Pruning for Large Language Models",
NeurIPS 2024, arXiv 2412.18110 (§3.1–3.4; section numbers below are the paper's).

For every decoder layer, in order, on the outputs of the already *pruned* previous layers:

1. accumulate H = (2/T)·Σ x xᵀ of the `o_proj` inputs (fp32, or fp64), damp it (percdamp·mean diag);
2. heads — batched greedy (§3.2): per iteration, H⁻¹ from the downdated H, every live unit scored
   with the grouped Cholesky score (d_j = Schur-complement diagonal of its H⁻¹ block; "exact" =
   ZipLM's tr(W_S B⁻¹ W_Sᵀ), "naive" = the −GCD ablation), the lowest pruned with exact sequential
   OBS on the surviving `o_proj` columns (`pruning_core.obs`). GQA: a unit is a whole KV group
   (n_rep·head_dim columns, `gqa="kv_group"`) or a query head with the same number removed in every
   group (`gqa="per_group"`);
3. re-run the layer, accumulate H of the `down_proj` inputs, prune FFN channels by batched greedy
   with the dynamic group size schedule (§3.3), updating the surviving `down_proj` columns;
4. the layer engine re-runs the modified layer; its outputs feed layer i+1 (`hessian_inputs="dense"`: the
   layer's dense outputs do, so no layer sees the pruning of the earlier ones — an ablation).

Per-layer ratio: the incremental pruning ratio (§3.4) r_i = r_0 + (r_last − r_0)·ln(1+i)/ln(L) with
the model's real L and r_0 = r0_fraction·r_last; r_last is *solved* (bisection) so the parameters
removed from the decoder layers, after rounding to whole heads / KV groups and channels, equal the
target (the FFN absorbs the rounding residual of the head counts, to within one channel; with the
uniform schedule the same number of channels in every layer, so to within L/2 channels).

Pruned structures are left as zero columns of o_proj / down_proj (their q/k/v and gate/up rows are
dead); `surgery.apply_plan` removes them, leaving the function unchanged.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field

from .. import obs
from ..capture import Accumulator
from ..engine import run_pass
from ..plan import LayerPlan, PrunePlan
from ..search import Budget, SearchSettings, search_schedule, searched_notes, with_profile
from ..select import SCHEDULE_NAMES, check_ratio, sizes_plan, solve_schedule
from .base import Method, MethodSettings, register


class SlimGPTSettings(MethodSettings):
    percdamp: float = Field(0.01, ge=0.0, description="dampening λ = percdamp · mean(diag H), >= 0")
    head_score: Literal["grouped", "exact", "naive"] = Field(
        "grouped", description="grouped Cholesky (paper), exact block OBS (ZipLM) or naive (−GCD ablation)")
    dynamic_group_size: bool = Field(True, description="DGS schedule for FFN batches (False: −DGS ablation, "
                                                       "fixed batches of ffn_group_cap)")
    ffn_group_floor: int = Field(64, ge=1, description="smallest FFN batch of the DGS schedule (code: 64, paper text: 8)")
    ffn_group_cap: int = Field(1024, ge=1, description="largest FFN batch")
    compensate: bool = Field(True, description="OBS update of surviving columns (False: zero only, ablation)")
    schedule: Literal[(*SCHEDULE_NAMES, "search")] = Field(
        "log_increase", description=", ".join(SCHEDULE_NAMES) + " or search (pruning_core/search.py)")
    search: SearchSettings = Field(default_factory=SearchSettings, description="settings of schedule: search")
    budget: Budget | None = Field(None, description="schedule: search under a serving-memory budget instead of ratio")
    r0_fraction: float = Field(0.25, ge=0.0, le=1.0, description="r_0 = r0_fraction · r_last (README: 1/4)")
    # the defaults of gqa and head_ratio_scale were chosen by measurement: benchmarks/RESULTS.md, ood-slimgpt
    gqa: Literal["kv_group", "per_group"] = Field("per_group", description=(
        "per_group (query heads, the same number in every KV group; K/V kept) or kv_group (whole KV groups)"))
    head_ratio_scale: float = Field(0.75, ge=0.0, le=1.0, description=(
        "heads are removed at this multiple of the layer's ratio (paper: 1; 0: FFN only); the ratios are "
        "solved so the parameter budget holds either way"))
    hessian_inputs: Literal["pruned", "dense"] = Field("pruned", description=(
        "pruned (paper, code: each layer's Hessians come from the outputs of the already pruned layers, so "
        "errors are compensated downstream) or dense (every layer sees the dense model's activations)"))
    stat_dtype: Literal["float32", "float64"] = Field("float32", description="dtype of Hessians and updates")
    batch_size: int = Field(8, ge=1, description="calibration blocks per forward call")


# -- the coupled prune step ---------------------------------------------------------------------


def _head_groups(n_heads: int, n_kv: int, hd: int, gqa: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    rep = n_heads // n_kv
    if gqa == "kv_group" or rep == 1:
        return torch.arange(n_heads * hd).view(n_kv, rep * hd), None
    return torch.arange(n_heads * hd).view(n_heads, hd), torch.arange(n_heads) // rep


def _hessian(grams: Accumulator, key: str) -> torch.Tensor:
    """H = (2/T)·Σ x xᵀ over the T calibration tokens (SlimGPT §3.1, the layer-wise OBS Hessian)."""
    return grams.data[key] * (2.0 / max(grams.rows[key], 1))


def _zero_output(lin) -> None:
    lin.weight.data.zero_()
    if lin.bias is not None:
        lin.bias.data.zero_()


class SlimGPTConsumer:
    """The per-layer OBS step as a consumer of the layer engine: `begin` takes the Hessians on the
    layer's inputs (the already pruned layers' outputs), prunes and updates it in place; the engine
    then runs the pruned layer to give the next layer its inputs (or the dense outputs, ablation)."""

    def __init__(self, model, adapter, sched: dict, s: SlimGPTSettings, dev: torch.device, progress=None):
        self.model, self.adapter, self.sched, self.s, self.dev = model, adapter, sched, s, dev
        self.sdt = torch.float64 if s.stat_dtype == "float64" else torch.float32
        self.layers_plan: list[LayerPlan] = []
        self.losses: list[dict] = []
        self.progress, self.n_layers = progress, len(adapter.layers(model))
        self._changed = False

    def begin(self, step) -> None:
        model, adapter, s, sdt, dev = self.model, self.adapter, self.s, self.sdt, self.dev
        i, layer = step.index, step.layer
        lp = LayerPlan(i)
        self._changed = False
        shape = adapter.layer_shape(model, layer)
        kh, kf = self.sched["heads"][i], self.sched["ffn"][i]
        if shape.kind != "decoder" or (kh == 0 and kf == 0):
            self.layers_plan.append(lp)
            return
        self._changed = True
        o_lin, d_lin = adapter.proj(layer, adapter.o), adapter.proj(layer, adapter.mlp_out)
        # search.drop_blocks: a whole sub-block goes — its output projection is zeroed (no OBS: nothing is
        # left to compensate with), surgery then removes it exactly
        no_attn, no_ffn = i in self.sched.get("drop_attn", ()), i in self.sched.get("drop_ffn", ())
        grams = Accumulator(sdt)
        h_attn = {adapter.module_name(adapter.o): grams.gram_hook("attn")} if not no_attn else {}
        h_mlp = {adapter.module_name(adapter.mlp_out): grams.gram_hook("mlp")} if not no_ffn else {}
        hooks = h_attn if kh > 0 else {**h_attn, **h_mlp}
        dense = s.hessian_inputs == "dense"
        dense_out = step.run(hooks=hooks, keep_outputs=dense) if hooks or dense else None
        loss = {}
        if no_attn:
            _zero_output(o_lin)
            lp.heads, lp.kv_heads = [], []
            loss["attn"] = 1.0
            if h_mlp:
                step.run(hooks=h_mlp, keep_outputs=False)  # the MLP's inputs without the attention
        if no_ffn:
            _zero_output(d_lin)
            lp.ffn, loss["ffn"] = [], 1.0
            lp.keep = not no_attn  # both sub-blocks gone: the layer goes
        if kh > 0 and not no_attn:
            W = o_lin.weight.data.to(sdt).clone()
            H, _ = obs.prepare_hessian(_hessian(grams, "attn"), W, s.percdamp)
            W0, H0 = W.clone(), H.clone()
            groups, bucket = _head_groups(shape.n_heads, shape.n_kv_heads, shape.head_dim, s.gqa)
            if bucket is None:
                gone = obs.prune_groups(W, H, groups.to(dev), kh, s.head_score, s.compensate)
                rep = shape.n_heads // shape.n_kv_heads
                lp.kv_heads = [g for g in range(shape.n_kv_heads) if g not in gone]
                lp.heads = [g * rep + j for g in lp.kv_heads for j in range(rep)]
            else:
                gone = obs.prune_groups(W, H, groups.to(dev), kh * shape.n_kv_heads, s.head_score,
                                        s.compensate, bucket=bucket, per_bucket=kh)
                lp.heads = [h for h in range(shape.n_heads) if h not in gone]
                lp.kv_heads = list(range(shape.n_kv_heads))
            loss["attn"] = obs.layer_loss(W0, W, H0) / max(float((W0 @ H0 * W0).sum()), 1e-30)
            o_lin.weight.data.copy_(W.to(o_lin.weight.dtype))
            if kf > 0 and h_mlp:
                step.run(hooks=h_mlp, keep_outputs=False)
        if kf > 0 and not no_ffn:
            W = d_lin.weight.data.to(sdt).clone()
            H, _ = obs.prepare_hessian(_hessian(grams, "mlp"), W, s.percdamp)
            W0, H0 = W.clone(), H.clone()
            sizes = obs.dgs_group_sizes(kf, s.ffn_group_floor, s.ffn_group_cap, s.dynamic_group_size)
            gone = set(obs.prune_columns_batched(W, H, kf, sizes, s.compensate))
            lp.ffn = [j for j in range(shape.ffn) if j not in gone]
            loss["ffn"] = obs.layer_loss(W0, W, H0) / max(float((W0 @ H0 * W0).sum()), 1e-30)
            d_lin.weight.data.copy_(W.to(d_lin.weight.dtype))
        if dense_out is not None:  # the next layer sees this layer's dense outputs
            step.outputs = dense_out
        self.losses.append(loss)
        self.layers_plan.append(lp)

    def after(self, step) -> bool:
        if self.progress:
            self.progress(step.index + 1, self.n_layers)
        return self._changed


def _schedule(model, adapter, calib_ids, ratio, s: SlimGPTSettings, device, tables=None) -> dict:
    if s.schedule != "search":
        return solve_schedule(model, adapter, ratio, s.schedule, s.r0_fraction, s.gqa, s.head_ratio_scale,
                              uniform_heads=s.servable == "vllm")
    sched = search_schedule(model, adapter, calib_ids, ratio, s.gqa, s.percdamp, s.compensate, s.head_score,
                            s.search, s.budget, s.servable, device, s.batch_size, tables=tables)
    return with_profile(model, adapter, sched, "log_increase", s.gqa, r0_fraction=s.r0_fraction,
                        head_scale=s.head_ratio_scale)  # the default profile, for the report


def prune(model, adapter, calib_ids: torch.Tensor, ratio: float, settings: SlimGPTSettings | None = None,
          device="cpu", progress=None, tables: dict | None = None) -> PrunePlan:
    """SlimGPT on `model` in place (surviving o_proj / down_proj columns updated, pruned ones zeroed).
    Returns the plan; `surgery.apply_plan(model, plan)` then removes the dead structures.
    `tables`: `search.build_tables`' artifact for `schedule: search` (computed here when absent)."""
    s = settings or SlimGPTSettings()
    ratio = check_ratio(ratio)
    sched = _schedule(model, adapter, calib_ids, ratio, s, device, tables)
    t0 = time.perf_counter()
    cons = SlimGPTConsumer(model, adapter, sched, s, torch.device(device), progress)
    with obs.exact_matmul():  # TF32 off for this block only (other threads' blocks counted, obs.py)
        run_pass(model, adapter, [cons], calib_ids, device=torch.device(device), batch_size=s.batch_size)
    plan = PrunePlan(method="slimgpt", settings=s.model_dump(), layers=cons.layers_plan, target_ratio=ratio,
                     per_layer_ratio=[float(r) for r in sched["ratios"]])
    from ..metrics import plan_params

    plan.params_before, plan.params_after = plan_params(model, plan)
    plan.notes = {"r_last": sched["r_last"], "realised_decoder_ratio": sched["realised"],
                  "removed_head_units": sched["heads"], "removed_ffn": sched["ffn"],
                  "relative_layer_loss": cons.losses, "seconds": time.perf_counter() - t0}
    if "search" in sched:
        plan.notes["search"] = searched_notes(sched)
    return plan


def planned_sizes(model, adapter, ratio: float, settings: SlimGPTSettings | None = None) -> PrunePlan:
    s = settings or SlimGPTSettings()
    if s.schedule == "search":  # the searched widths need the calibration data: the profile it starts from
        s = s.model_copy(update={"schedule": "log_increase"})
    sched = solve_schedule(model, adapter, check_ratio(ratio), s.schedule, s.r0_fraction, s.gqa, s.head_ratio_scale,
                           uniform_heads=s.servable == "vllm")
    return sizes_plan(model, adapter, sched, s.gqa, "slimgpt", s.model_dump(), ratio)


register(Method(
    name="slimgpt",
    summary="layer-wise structured OBS on heads and FFN channels with compensation, log-increasing ratio",
    settings=SlimGPTSettings,
    paper="Ling et al., NeurIPS 2024, arXiv 2412.18110",
    targets=("heads", "ffn"),
    prune=prune,
    sizes=planned_sizes,
))
