"""FLAP: fluctuation-based adaptive structured pruning with bias compensation (retraining-free).

An, Zhao, Yu, Tang, Wang, "Fluctuation-based Adaptive Structured Pruning for Large Language
Models", AAAI 2024, arXiv 2312.11983; code CASIA-IVA-Lab/FLAP (`lib/prune.py`, `lib/layerwrapper.py`).

Statistics are taken on the inputs x of `o_proj` and `down_proj` (per input channel j: mean and
sample variance over calibration tokens). Metrics (FLAP's `metrics`):

* `wifv` (default)  Var(x_j) · ||W[:, j]||²
* `ifv`             Var(x_j)
* `wifn`            mean_r |W_rj| · ||x_j||

A head's score is the sum over its head_dim channels of the squared metric (FLAP squares the
o_proj metric); a GQA unit (whole KV group) sums its heads. FFN channels use the metric directly.
Structure: `uniform` (FLAP's UL-UM: the same ratio in every layer; here the same removal counts as
SlimGPT's solved uniform schedule, so parameter budgets match) or `al_am` (FLAP's default:
z-score the scores within each layer and module, then one global threshold with every unit
weighted by its parameter count — FLAP's 512/3 channels per head).

Compensation (FLAP eq. 8): the pruned columns are zeroed and the bias b += W[:, S]·mean(x_S) is
added to `o_proj` / `down_proj` — the least-squares optimal constant offset for the removed inputs.
Llama-like models have no such biases: zero biases are added to o_proj / down_proj, and
`surgery.settle_biases` makes the checkpoint keep them — Llama through its `attention_bias` /
`mlp_bias` flags (a stock checkpoint); Qwen2 and Mistral, which hard-code `bias=False`, are saved
as the equivalent stock Llama when no layer uses a sliding window, else with a per-layer record of
the biases that `checkpoint.load_pruned` reads.

Streaming (consumers of the layer engine): with `uniform`, layers are processed in order on the
outputs of the already pruned layers (as FLAP's UL-UM loop compresses each layer before computing its
outputs). `al_am` needs all layers' scores before the global threshold, so (as in FLAP) its
statistics are taken on the dense model in one pass, then a second, weights-only pass prunes every
layer while it is resident (under `placement: disk` too: the changed layers are spilled).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from ..capture import Accumulator
from ..engine import run_pass
from ..errors import ConfigError
from ..plan import LayerPlan, PrunePlan
from ..search import Budget, SearchSettings, search_schedule, searched_notes, with_profile
from ..select import check_ratio, sizes_plan, solve_schedule, unit_counts
from ..surgery import settle_biases
from .base import Method, MethodSettings, register


class FLAPSettings(MethodSettings):
    metric: Literal["wifv", "ifv", "wifn"] = Field("wifv", description="wifv, ifv or wifn")
    structure: Literal["uniform", "al_am"] = Field("uniform", description="uniform (UL-UM) or al_am (global z-score)")
    bias_compensation: bool = Field(True, description="add W[:,S]·mean(x_S) to the o_proj / down_proj bias")
    # the default kv_group was chosen by measurement (FLAP has no weight update): benchmarks/RESULTS.md, ood-slimgpt
    gqa: Literal["kv_group", "per_group"] = Field("kv_group", description=(
        "kv_group (whole KV groups) or per_group (query heads, the same number in every KV group); "
        "al_am pools whole KV groups"))
    batch_size: int = Field(8, ge=1, description="calibration blocks per forward call")
    schedule: Literal["uniform", "search"] = Field("uniform", description=(
        "uniform (the structure's counts) or search (pruning_core/search.py; structure uniform only)"))
    search: SearchSettings = Field(default_factory=SearchSettings, description="settings of schedule: search")
    budget: Budget | None = Field(None, description="schedule: search under a serving-memory budget instead of ratio")

    @model_validator(mode="after")
    def _no_whole_blocks(self):
        if self.schedule == "search" and self.search.drop_blocks:
            raise ConfigError("search.drop_blocks", True, "false for flap (its compensation bias on o_proj / down_proj "
                                                          "has no place in an attention- or FFN-free layer)")
        return self


# -- pure maths ----------------------------------------------------------------------------------


def channel_metric(metric: str, W: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, sq_sum: torch.Tensor):
    """Per input column j of W [d_out, d_in]; mean/var/sq_sum are per-channel input statistics."""
    W = W.double()
    if metric == "wifv":
        return var * (W * W).sum(0)
    if metric == "ifv":
        return var.clone()
    if metric == "wifn":
        return W.abs().mean(0) * sq_sum.sqrt()
    raise ConfigError("method.settings.metric", metric, "wifv, ifv or wifn")


def flap_bias(W: torch.Tensor, mean_x: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """b = W[:, S] · mean(x_S): the constant that best replaces the removed inputs' contribution."""
    pruned = torch.as_tensor(pruned, dtype=torch.long)
    return W[:, pruned].double() @ mean_x[pruned].double()


def _moment_hooks(adapter) -> tuple[Accumulator, dict]:
    """fp64 per-channel sums and sums of squares of the o_proj ("o") and down_proj ("down") inputs."""
    acc = Accumulator(torch.float64)
    return acc, {adapter.module_name(adapter.o): acc.moments_hook("o"),
                 adapter.module_name(adapter.mlp_out): acc.moments_hook("down")}


def _scores(shape, o_lin, d_lin, acc: Accumulator, metric: str, gqa: str):
    """(unit scores for heads [units] or [heads], FFN channel scores, (o mean, down mean))."""
    ma, va, sa = acc.moments("o")
    mm, vm, sm = acc.moments("down")
    a = channel_metric(metric, o_lin.weight.data.cpu(), ma.cpu(), va.cpu(), sa.cpu()) ** 2
    head = a.view(shape.n_heads, shape.head_dim).sum(1)
    rep = shape.n_heads // shape.n_kv_heads
    if gqa == "kv_group" or rep == 1:
        head = head.view(shape.n_kv_heads, rep).sum(1)
    f = channel_metric(metric, d_lin.weight.data.cpu(), mm.cpu(), vm.cpu(), sm.cpu())
    return head, f, (ma, mm)


def _apply(model, adapter, layer, shape, lp: LayerPlan, gone_units, gone_ffn, means, gqa, bias: bool) -> bool:
    """Zero the removed units' columns (and compensate the bias) of a resident layer; True if it changed."""
    o_lin, d_lin = adapter.proj(layer, adapter.o), adapter.proj(layer, adapter.mlp_out)
    if o_lin.weight.device.type == "meta" or d_lin.weight.device.type == "meta":  # never prune a shell silently
        raise RuntimeError(f"FLAP: layer {lp.index} is not resident (the layer engine brings it for its pass)")
    rep = shape.n_heads // shape.n_kv_heads
    hd = shape.head_dim
    gone_heads: list[int] = []
    if gone_units:
        if gqa == "kv_group" or rep == 1:
            gone_heads = [g * rep + j for g in gone_units for j in range(rep)]
            lp.kv_heads = [g for g in range(shape.n_kv_heads) if g not in gone_units]
            lp.heads = [g * rep + j for g in lp.kv_heads for j in range(rep)]
        else:
            gone_heads = list(gone_units)
            lp.heads = [h for h in range(shape.n_heads) if h not in gone_heads]
            lp.kv_heads = list(range(shape.n_kv_heads))
    cols = torch.tensor([h * hd + j for h in gone_heads for j in range(hd)], dtype=torch.long)
    ffn = torch.tensor(sorted(gone_ffn), dtype=torch.long)
    if gone_ffn:
        lp.ffn = [j for j in range(shape.ffn) if j not in set(gone_ffn)]
    if bias and (cols.numel() or ffn.numel()):
        adapter.add_bias(layer, (adapter.o, adapter.mlp_out))
    changed = False
    for lin, idx, mean in ((o_lin, cols, means[0]), (d_lin, ffn, means[1])):
        if idx.numel() == 0:
            continue
        changed = True
        if bias:
            b = flap_bias(lin.weight.data.cpu(), mean.cpu(), idx)
            lin.bias.data += b.to(lin.bias.dtype).to(lin.bias.device)
        lin.weight.data[:, idx.to(lin.weight.device)] = 0
    return changed or bool(bias and (cols.numel() or ffn.numel()))


def _lowest(scores: torch.Tensor, k: int, bucket: torch.Tensor | None = None, per: int | None = None) -> list[int]:
    if k <= 0:
        return []
    if bucket is None:
        return sorted(torch.argsort(scores.double(), stable=True)[:k].tolist())
    out = []
    for b in bucket.unique().tolist():
        idx = (bucket == b).nonzero().view(-1)
        out += idx[torch.argsort(scores[idx].double(), stable=True)[:per]].tolist()
    return sorted(out)


class _Uniform:
    """UL-UM as an engine consumer: each layer's statistics on the outputs of the already pruned
    layers, then the layer is pruned before the engine computes its outputs."""

    def __init__(self, model, adapter, sched, s: FLAPSettings, layers_plan, progress):
        self.model, self.adapter, self.sched, self.s = model, adapter, sched, s
        self.layers_plan, self.progress, self.n = layers_plan, progress, len(adapter.layers(model))
        self._changed = False

    def begin(self, step) -> None:
        model, adapter, s = self.model, self.adapter, self.s
        i, layer = step.index, step.layer
        lp, shape = LayerPlan(i), adapter.layer_shape(model, layer)
        kh, kf = self.sched["heads"][i], self.sched["ffn"][i]
        self._changed = False
        if shape.kind == "decoder" and (kh or kf):
            o_lin, d_lin = adapter.proj(layer, adapter.o), adapter.proj(layer, adapter.mlp_out)
            acc, hooks = _moment_hooks(adapter)
            step.run(hooks=hooks, keep_outputs=False)
            head, f, means = _scores(shape, o_lin, d_lin, acc, s.metric, s.gqa)
            rep = shape.n_heads // shape.n_kv_heads
            if s.gqa == "per_group" and rep > 1:
                gone = _lowest(head, kh * shape.n_kv_heads, torch.arange(shape.n_heads) // rep, kh)
            else:
                gone = _lowest(head, kh)
            self._changed = _apply(model, adapter, layer, shape, lp, gone, _lowest(f, kf), means, s.gqa,
                                   s.bias_compensation)
        self.layers_plan.append(lp)

    def after(self, step) -> bool:
        if self.progress:
            self.progress(step.index + 1, self.n)
        return self._changed


def prune(model, adapter, calib_ids: torch.Tensor, ratio: float, settings: FLAPSettings | None = None,
          device="cpu", progress=None, tables: dict | None = None) -> PrunePlan:
    """FLAP on `model` in place (pruned columns zeroed, biases compensated); returns the plan.
    `schedule: search`: the per-layer counts come from `search` over `tables` (built here when absent)."""
    s = settings or FLAPSettings()
    ratio = check_ratio(ratio)
    if s.structure == "al_am" and s.gqa != "kv_group":
        raise ConfigError("method.settings.gqa", s.gqa, "kv_group (al_am pools whole KV groups)")
    if s.schedule == "search" and s.structure != "uniform":
        raise ConfigError("method.settings.schedule", "search", "uniform with structure al_am (search sets the "
                                                                "counts of structure uniform)")
    layers_plan: list[LayerPlan] = []
    dev = torch.device(device)
    if s.structure == "uniform":
        sched = solve_schedule(model, adapter, ratio, "uniform", gqa=s.gqa) if s.schedule != "search" else \
            search_schedule(model, adapter, calib_ids, ratio, s.gqa, compensate=False, settings=s.search,
                            budget=s.budget, servable=s.servable, device=device, batch_size=s.batch_size,
                            tables=tables, whole_blocks_ok=False)
        if "search" in sched:
            sched = with_profile(model, adapter, sched, "uniform", s.gqa)
        per_layer = sched["ratios"]
        run_pass(model, adapter, [_Uniform(model, adapter, sched, s, layers_plan, progress)], calib_ids, device=dev,
                 batch_size=s.batch_size)
    else:
        per_layer = _al_am(model, adapter, calib_ids, dev, ratio, s, layers_plan, progress)
    plan = PrunePlan(method="flap", settings=s.model_dump(), layers=layers_plan, target_ratio=ratio,
                     per_layer_ratio=[float(r) for r in per_layer])
    from ..metrics import plan_params

    settle_biases(model, adapter)  # the flags / zero biases the checkpoint will carry, counted in the plan
    plan.params_before, plan.params_after = plan_params(model, plan)
    if s.structure == "uniform" and "search" in sched:
        plan.notes["search"] = searched_notes(sched)
    return plan


def _global_removal(entries, units, collected, goal: float, heads_per_layer: int | None = None) -> dict:
    """Units removed in ascending z order until the removed parameters get closest to `goal`.
    `heads_per_layer`: every layer loses exactly its k lowest-z heads first; the FFN takes the rest."""
    removed = 0
    gone = {i: {"head": [], "ffn": []} for i in collected}
    if heads_per_layer is not None:
        for _z, w, i, kind, j in entries:
            if kind == "head" and len(gone[i]["head"]) < min(heads_per_layer, units[i]["units"] - 1):
                gone[i]["head"].append(j)
                removed += w
    for _z, w, i, kind, j in entries:
        if heads_per_layer is not None and kind == "head":
            continue
        if removed + w / 2 > goal:  # stop at the unit that gets closest to the goal
            continue
        limit = units[i]["units"] if kind == "head" else units[i]["ffn"]
        if len(gone[i][kind]) >= limit - 1:
            continue
        gone[i][kind].append(j)
        removed += w
    return gone


class _DenseScores:
    """al_am's first pass: every decoder layer's scores on the dense model's statistics."""

    def __init__(self, model, adapter, metric: str, n: int, progress):
        self.model, self.adapter, self.metric, self.n, self.progress = model, adapter, metric, n, progress
        self.collected: dict = {}
        self._acc = None

    def observe(self, step) -> dict:
        self._acc = None
        if self.adapter.layer_shape(self.model, step.layer).kind != "decoder":
            return {}
        self._acc, hooks = _moment_hooks(self.adapter)
        return hooks

    def after(self, step) -> bool:
        if self._acc is not None:
            a, layer = self.adapter, step.layer
            shape = a.layer_shape(self.model, layer)
            o_lin, d_lin = a.proj(layer, a.o), a.proj(layer, a.mlp_out)
            self.collected[step.index] = (shape, *_scores(shape, o_lin, d_lin, self._acc, self.metric, "kv_group"))
        if self.progress:
            self.progress(step.index + 1, self.n)
        return False


class _ApplyGone:
    """al_am's second pass (weights only): every layer loses its globally chosen units."""

    def __init__(self, model, adapter, collected, gone, units, s: FLAPSettings, layers_plan):
        self.model, self.adapter, self.collected, self.gone, self.units = model, adapter, collected, gone, units
        self.s, self.layers_plan, self.ratios = s, layers_plan, []
        self._changed = False

    def begin(self, step) -> None:
        i, lp, gone = step.index, LayerPlan(step.index), self.gone
        self._changed = False
        if i in self.collected:
            shape, _h, _f, means = self.collected[i]
            self._changed = _apply(self.model, self.adapter, step.layer, shape, lp, sorted(gone[i]["head"]),
                                   gone[i]["ffn"], means, "kv_group", self.s.bias_compensation)
            u = self.units[i]
            self.ratios.append((len(gone[i]["head"]) * u["unit_params"] + len(gone[i]["ffn"]) * u["ch_params"])
                               / u["total"])
        else:
            self.ratios.append(0.0)
        self.layers_plan.append(lp)

    def after(self, step) -> bool:
        return self._changed


def _al_am(model, adapter, calib_ids, dev, ratio, s: FLAPSettings, layers_plan, progress) -> list[float]:
    units = unit_counts(model, adapter, "kv_group")
    dense = _DenseScores(model, adapter, s.metric, len(units), progress)
    run_pass(model, adapter, [dense], calib_ids, device=dev, batch_size=s.batch_size)  # dense statistics
    collected = dense.collected
    # z-score within each layer and module, then one global threshold weighted by parameter count
    entries = []  # (z, params, layer, kind, unit)
    for i, (_shape, head, f, _m) in collected.items():
        for kind, sc, w in (("head", head, units[i]["unit_params"]), ("ffn", f, units[i]["ch_params"])):
            z = (sc - sc.mean()) / (sc.std() if sc.numel() > 1 and sc.std() > 0 else 1.0)
            entries += [(float(z[j]), w, i, kind, j) for j in range(sc.numel())]
    entries.sort(key=lambda e: e[0])
    total = sum(u["total"] for u in units if u)
    gone = _global_removal(entries, units, collected, ratio * total)
    if s.servable == "vllm":  # the same number of KV groups in every layer: the mean of the free choice
        k = int(sum(len(g["head"]) for g in gone.values()) / max(len(gone), 1) + 0.5)
        gone = _global_removal(entries, units, collected, ratio * total, heads_per_layer=k)
    apply = _ApplyGone(model, adapter, collected, gone, units, s, layers_plan)
    run_pass(model, adapter, [apply])  # weights only: each layer resident while it is pruned
    return apply.ratios


def planned_sizes(model, adapter, ratio: float, settings: FLAPSettings | None = None) -> PrunePlan | None:
    """Kept sizes of the uniform structure; None for al_am (its sizes depend on the calibration data)."""
    s = settings or FLAPSettings()
    if s.structure != "uniform":
        return None
    sched = solve_schedule(model, adapter, check_ratio(ratio), "uniform", gqa=s.gqa)
    return sizes_plan(model, adapter, sched, s.gqa, "flap", s.model_dump(), ratio)


register(Method(
    name="flap",
    summary="fluctuation metric (WIFV) + bias compensation, retraining-free (baseline)",
    settings=FLAPSettings,
    paper="An et al., AAAI 2024, arXiv 2312.11983",
    targets=("heads", "ffn"),
    prune=prune,
    sizes=planned_sizes,
))
