"""LLM-Streamline: remove the most redundant block of consecutive layers, train a light replacement.

Paper: Chen et al., "Streamlining Redundant Layers to Compress Large Language Models", ICLR 2025
(arXiv 2403.19135 v5). Spec: `shared/specs/llm-streamline.md`.

Block importance (§3.1, spec §1): x^(l) is the hidden state entering layer l (x^(0) the embeddings,
x^(L) the last layer's output *before* the final norm, captured by the layer stream, not HF's normed
last hidden state). A block of m layers starting at l is scored by the mean over calibration tokens
of cos(x_t^(l), x_t^(l+m)); the block with the highest cosine (it changes the residual stream least)
is chosen: l* = argmax_l cos(x^(l), x^(l+m)).

Replacement (Eq. 3): a light network f_θ is trained with the rest of the model frozen to minimise
mean ||f_θ(x^(l*)) − x^(l*+m)||² (element-wise MSE). Variants (setting `replacement`):

* `none`  — the n layers are deleted, nothing is trained ("Ours(None)").
* `layer` — m = n+1 layers are replaced by one decoder layer initialised from layer l* ("Layer-First");
  in plan terms layer l* is kept and the next n are dropped, so the checkpoint is a stock HF model.
* `collapse` — baseline, LaCo-style (Yang et al. 2024, RDSC layer merge): the m = n+1 layers are merged
  into one, θ* = θ_l* + Σ_k (θ_k − θ_l*) over the block's projection weights (norms from layer l*),
  untrained. Only the merge rule is LaCo's; its iterative top-down threshold search is not reproduced.
* `ffn`   — m = n+1 layers are replaced by a residual FFN x + MLP(norm(x)) initialised from layer l*'s
  MLP and post-attention norm (the residual, inherited form recommended by the spec's pitfall 6
  instead of upstream's random, residual-free ReLU MLP). Saved through `checkpoint.load_pruned`.

Training differs from the reference script on purpose (spec §7): the replacement is called with
the exact keyword arguments the real model passes to layer l* (causal mask, rotary
`position_embeddings`), caught by a forward pre-hook — never `attention_mask=None` bidirectional
attention; `use_cache=False` and surgery renumbers `layer_idx`; the cosine schedule decays per
optimiser step down to its floor; the best weights on validation are *copied*.

Baseline `shortgpt` (Men et al. 2024): Block Influence BI_l = 1 − E_t[cos(x^(l), x^(l+1))]; the n
individually least influential layers are removed (not necessarily contiguous). No training.
"""

from __future__ import annotations

import copy
import importlib
import math
import time
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from ..adapters import Adapter, adapter_for
from ..errors import ConfigError, DataError
from ..plan import LayerPlan, PrunePlan
from ..surgery import count_params
from .base import Method, MethodSettings, Scores, register

# ------------------------------------------------------------------------------------------------
# settings


class StreamlineSettings(MethodSettings):
    replacement: Literal["none", "layer", "ffn", "collapse"] = Field(
        "layer",
        description="none (delete the block), layer (one decoder layer), ffn (residual FFN) or collapse "
        "(LaCo-style parameter merge of the block into one layer, untrained baseline)",
    )
    n_layers: int | None = Field(None, ge=1, description="layers to remove (net); overrides the ratio")
    # training of the replacement (recovery step)
    steps: int = Field(200, ge=0, description="optimiser steps")
    batch_size: int = Field(4, ge=1, description="token blocks per step")
    lr: float = Field(2e-4, gt=0, description="peak learning rate (AdamW)")
    min_lr: float = Field(5e-5, ge=0, description="floor of the cosine schedule")
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(1e-3, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(5.0, gt=0, description="max gradient norm")
    val_fraction: float = Field(0.125, gt=0, lt=1, description="fraction of the training blocks held out")
    eval_every: int = Field(50, ge=1, description="validate every this many steps (and at the end)")
    loss_skip_tokens: int = Field(0, ge=0, description="leading tokens of each block left out of the MSE")
    seq_len: int = Field(128, ge=2, description="block length when the training ids come as one 1-D stream")
    max_blocks: int | None = Field(None, ge=2, description="at most this many training blocks (None: all)")
    cache_targets: bool = Field(
        False,
        description="keep each fixed batch's (input, target) after its first on-the-fly computation "
        "(same values, one dense pass per batch instead of one per epoch; memory grows with the data)",
    )
    seed: int = 0


class ShortGPTSettings(MethodSettings):
    n_layers: int | None = Field(None, ge=1, description="layers to remove; overrides the ratio")


# ------------------------------------------------------------------------------------------------
# scoring: pure functions on the cosine matrix


def block_influence(cos: torch.Tensor) -> torch.Tensor:
    """ShortGPT BI_l = 1 − cos(x^(l), x^(l+1)) for l = 0..L−1, from the [L+1, L+1] cosine matrix."""
    n = cos.shape[0] - 1
    return 1.0 - torch.stack([cos[i, i + 1] for i in range(n)])


def block_cosines(cos: torch.Tensor, m: int) -> torch.Tensor:
    """cos(x^(l), x^(l+m)) for every start l = 0..L−m (the redundancy of each m-layer block)."""
    n = cos.shape[0] - 1
    if not 1 <= m <= n:
        raise ConfigError("n_layers", m, f"a block size between 1 and {n}")
    return torch.stack([cos[i, i + m] for i in range(n - m + 1)])


def best_block(cos: torch.Tensor, m: int) -> int:
    """l* = argmax_l cos(x^(l), x^(l+m)): the start of the most redundant m-layer block."""
    return int(torch.argmax(block_cosines(cos, m)))


def score(model: nn.Module, adapter: Adapter, stats: dict, settings) -> Scores:
    """Scores from `capture_stats(..., requests={"cosine"})`: the full cosine matrix (every block
    size is read off it, so one capture serves every ratio) and ShortGPT's per-layer BI."""
    if "cosine" not in stats:
        raise ConfigError(
            "capture.requests", sorted(k for k in stats if "." not in k), "statistics including 'cosine'"
        )
    cos = stats["cosine"].to(torch.float64)
    n_layers = len(adapter.layers(model))
    if cos.shape != (n_layers + 1, n_layers + 1):
        raise ConfigError(
            "stats.cosine", tuple(cos.shape), f"a [{n_layers + 1}, {n_layers + 1}] matrix for this model"
        )
    return {"block_cos": cos, "layer_bi": block_influence(cos)}


# ------------------------------------------------------------------------------------------------
# selection




def n_from_ratio(
    ratio: float | None, total: int, per_layer: float, n_layers: int, override: int | None
) -> int:
    """Layers to remove (net): `override` if given, else round(ratio · total / params per layer)
    (the ratio is a fraction of *all* parameters, embeddings included, as the paper counts)."""
    limit = n_layers - 1
    if override is not None:
        n = int(override)
    else:
        if ratio is None or not 0 < float(ratio) < 1:
            raise ConfigError(
                "ratio", ratio, "a fraction of parameters strictly between 0 and 1 (or settings.n_layers)"
            )
        n = max(1, round(float(ratio) * total / per_layer))
    if n > limit:
        raise ConfigError(
            "ratio" if override is None else "method.settings.n_layers",
            ratio if override is None else n,
            f"a value that removes at most {limit} of {n_layers} layers",
        )
    return n


def _ffn_params(adapter: Adapter, layer: nn.Module) -> int:
    return count_params(adapter.mlp(layer)) + count_params(getattr(layer, _ffn_norm_name(adapter)))


def _depth_budget(model: nn.Module, adapter: Adapter, ratio: float | None, n_layers: int | None):
    """(layers, total params, params per layer, number of layers to remove) for a depth method."""
    layers = adapter.layers(model)
    total = count_params(model)
    per = [count_params(layer) for layer in layers]
    return layers, total, per, n_from_ratio(ratio, total, sum(per) / len(layers), len(layers), n_layers)


def select(model: nn.Module, adapter: Adapter, scores: Scores, ratio: float | None, settings) -> PrunePlan:
    """The most redundant contiguous block for the ratio; a PrunePlan dropping it (and marking the
    replacement on its first layer for the `layer` / `ffn` variants)."""
    s = settings if isinstance(settings, StreamlineSettings) else StreamlineSettings(**(settings or {}))
    layers, total, per, n = _depth_budget(model, adapter, ratio, s.n_layers)
    L = len(layers)
    cos = scores["block_cos"]
    plan_layers = [LayerPlan(i) for i in range(L)]
    m = n if s.replacement == "none" else n + 1  # a replacement takes the place of n + 1 layers
    start = best_block(cos, m)
    for i in range(start, start + m):
        plan_layers[i].keep = False
    after = total - sum(per[start : start + m])
    if s.replacement != "none":
        plan_layers[start].keep = True
        plan_layers[start].replacement = {"kind": s.replacement, "span": [start, start + m]}
        after += _ffn_params(adapter, layers[start]) if s.replacement == "ffn" else per[start]
    return PrunePlan(
        method="llm-streamline",
        settings=s.model_dump(),
        layers=plan_layers,
        target_ratio=ratio,
        params_before=total,
        params_after=after,
        notes={
            "block": [start, start + m],
            "block_cos": float(cos[start, start + m]),
            "layers_removed": n,
            "replacement": s.replacement,
        },
    )


def select_shortgpt(
    model: nn.Module, adapter: Adapter, scores: Scores, ratio: float | None, settings
) -> PrunePlan:
    """Remove the n layers with the lowest Block Influence (ShortGPT, Men et al. 2024, §3)."""
    s = settings if isinstance(settings, ShortGPTSettings) else ShortGPTSettings(**(settings or {}))
    layers, total, per, n = _depth_budget(model, adapter, ratio, s.n_layers)
    L = len(layers)
    bi = scores["layer_bi"].to(torch.float64)
    drop = sorted(int(i) for i in torch.argsort(bi, stable=True)[:n])
    plan_layers = [LayerPlan(i, keep=i not in drop) for i in range(L)]
    return PrunePlan(
        method="shortgpt",
        settings=s.model_dump(),
        layers=plan_layers,
        target_ratio=ratio,
        params_before=total,
        params_after=total - sum(per[i] for i in drop),
        notes={"removed_layers": drop, "layers_removed": n, "bi": [round(float(b), 6) for b in bi]},
    )


# ------------------------------------------------------------------------------------------------
# the residual FFN replacement module


def _ffn_norm_name(adapter: Adapter) -> str:
    if not adapter.mlp_path:
        raise ConfigError(
            "method.settings.replacement",
            "ffn",
            f"none or layer for the {adapter.family} family (its MLP is not a separate module)",
        )
    return getattr(adapter, "ffn_norm", "post_attention_layernorm")


class ResidualFFN(nn.Module):
    """x + MLP(norm(x)): a decoder layer without attention. Accepts the decoder-layer call
    signature (hidden_states, **kwargs) and returns a tensor, so it sits in the layer list."""

    pruneflow_kind = "ffn"

    def __init__(self, norm: nn.Module, mlp: nn.Module):
        super().__init__()
        self.norm = norm
        self.mlp = mlp

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states + self.mlp(self.norm(hidden_states))


def ffn_from_layer(adapter: Adapter, layer: nn.Module) -> ResidualFFN:
    """A ResidualFFN initialised (deep copies) from a decoder layer's MLP and post-attention norm."""
    norm = copy.deepcopy(getattr(layer, _ffn_norm_name(adapter)))
    ffn = ResidualFFN(norm, copy.deepcopy(adapter.mlp(layer)))
    p = next(layer.parameters())
    return ffn.to(device=p.device, dtype=p.dtype)


def _decoder_layer_class(config) -> type:
    mt = config.model_type
    mod = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    for name in dir(mod):
        if name.endswith("DecoderLayer") and name.lower().startswith(mt.replace("_", "")):
            return getattr(mod, name)
    raise ConfigError("model.architecture", mt, "a transformers model with a *DecoderLayer class")


def _ffn_empty(config, desc: dict) -> ResidualFFN:
    adapter = adapter_for(config)
    cfg = copy.deepcopy(config)
    if "ffn" in desc:
        setattr(cfg, adapter.ffn_sizes_key(), int(desc["ffn"]))
    if hasattr(cfg, "pruneflow_layers"):
        delattr(cfg, "pruneflow_layers")
    layer = _decoder_layer_class(cfg)(cfg, layer_idx=0)
    return ResidualFFN(getattr(layer, _ffn_norm_name(adapter)), adapter.mlp(layer))


def _ffn_describe(module: ResidualFFN) -> dict:
    sizes = [m.in_features for m in module.mlp.modules() if isinstance(m, nn.Linear)]
    return {"ffn": int(sizes[-1])}  # the output projection's input = FFN channels


@torch.no_grad()
def collapse_block(model: nn.Module, adapter: Adapter, layers: list[nn.Module]) -> nn.Module:
    """LaCo's Reserving-Differences-while-Seeking-Common merge of `layers` into one decoder layer:
    every Linear weight/bias becomes θ_0 + Σ_{k≥1} (θ_k − θ_0); norms are layer 0's."""
    merged = copy.deepcopy(layers[0])
    names = [n for n, mod in merged.named_modules() if isinstance(mod, nn.Linear)]
    for name in names:
        lin = merged.get_submodule(name)
        for attr in ("weight", "bias"):
            t = getattr(lin, attr)
            if t is None:
                continue
            base = getattr(layers[0].get_submodule(name), attr)
            for other in layers[1:]:
                o = getattr(other.get_submodule(name), attr)
                if o.shape != base.shape:
                    raise ConfigError(
                        "plan.replacement", "collapse", "a block of layers with identical shapes"
                    )
                t.add_(o - base)
    return merged


def _collapse_from_plan(model, adapter, layer, spec):
    start, end = (int(x) for x in spec["span"])
    return collapse_block(model, adapter, [adapter.layers(model)[i] for i in range(start, end)])


def _not_saved(*_a):  # a collapsed layer is an ordinary decoder layer: never described or rebuilt
    raise ConfigError("plan.replacement.kind", "collapse", "a plain decoder layer after surgery")


def _register_layer_kind() -> None:
    try:
        from ..surgery import LayerKind, register_layer_kind
    except ImportError:  # surgery not there (the core is being assembled)
        return
    register_layer_kind(
        LayerKind(
            name="ffn",
            from_plan=lambda model, adapter, layer, spec: ffn_from_layer(adapter, layer),
            describe=_ffn_describe,
            empty=_ffn_empty,
        )
    )
    register_layer_kind(
        LayerKind(name="collapse", from_plan=_collapse_from_plan, describe=_not_saved, empty=_not_saved)
    )


# ------------------------------------------------------------------------------------------------
# training the replacement (recovery step)


class _Stop(Exception):
    pass


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def block_io(dense: nn.Module, adapter: Adapter, ids: torch.Tensor, start: int, end: int):
    """Run the frozen dense model on `ids` up to layer end−1 and return (x^(start), kwargs, x^(end)):
    the block's input, the keyword arguments the real forward passes to layer `start` (causal mask,
    rotary position_embeddings, position_ids...) and the block's output, before any final norm."""
    layers = adapter.layers(dense)
    got: dict = {}

    def pre(mod, args, kwargs):
        got["x"] = args[0] if args else kwargs["hidden_states"]
        kw = {
            k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")
        }
        kw["use_cache"] = False
        got["kw"] = kw

    def post(mod, args, kwargs, out):
        got["y"] = _first(out)
        raise _Stop

    h1 = layers[start].register_forward_pre_hook(pre, with_kwargs=True)
    h2 = layers[end - 1].register_forward_hook(post, with_kwargs=True)
    try:
        dense(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        h1.remove()
        h2.remove()
    return got["x"], got["kw"], got["y"]


def lr_at(step: int, total: int, s: StreamlineSettings) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from `lr` down to `min_lr`, reached exactly
    at the last optimiser step (upstream counted micro-batches and stepped per update, so its decay
    barely happened)."""
    w = min(s.warmup_steps, max(total - 1, 0))
    if step < w:
        return s.lr * (step + 1) / w
    span = max(total - 1 - w, 1)
    t = min(max(step - w, 0) / span, 1.0)
    return s.min_lr + (s.lr - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def replacement_of(plan: PrunePlan) -> tuple[int, int, int, str]:
    """(index in the pruned model, block start, block end, kind) of the plan's replacement."""
    reps = [lp for lp in plan.layers if lp.keep and lp.replacement]
    if len(reps) != 1:
        raise ConfigError(
            "plan",
            plan.method,
            "a plan with exactly one replacement (llm-streamline with replacement 'layer' or 'ffn')",
        )
    lp = reps[0]
    start, end = (int(x) for x in lp.replacement.get("span", [lp.index, lp.index + 1]))
    new_idx = sum(1 for q in plan.layers if q.keep and q.index < lp.index)
    return new_idx, start, end, lp.replacement["kind"]


def train_replacement(
    dense_model: nn.Module,
    pruned_model: nn.Module,
    plan: PrunePlan,
    train_ids: torch.Tensor,
    settings: StreamlineSettings | dict | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
    module: nn.Module | None = None,
) -> dict:
    """Train the replacement module of `pruned_model` (in place) to map x^(l*) to x^(l*+m) of the
    frozen `dense_model`; inputs and targets are computed on the fly per batch by the dense prefix
    (no_grad), with the real model's causal mask and rotary embeddings. `train_ids` [N, T] token
    blocks; the first `val_fraction` of them (at least one) is held out for validation. Everything
    but the replacement stays frozen. Returns {"loss_curve", "lr_curve", "val_curve" [(step, mse)],
    "val_mse_before", "val_mse_after", "best_step", "seconds", "train_tokens"}; the weights with the
    best validation MSE are kept."""
    s = settings if isinstance(settings, StreamlineSettings) else StreamlineSettings(**(settings or {}))
    device = torch.device(device)
    adapter = adapter_for(dense_model)
    new_idx, start, end, kind = replacement_of(plan)
    if train_ids.dim() != 2 or train_ids.shape[0] < 2:
        raise DataError("recovery.train_ids", tuple(train_ids.shape), "[N, T] token blocks with N >= 2")
    n_val = max(1, round(train_ids.shape[0] * s.val_fraction))
    val_ids, tr_ids = train_ids[:n_val], train_ids[n_val:]
    if module is None:  # the replacement inside a pruned model (else: given on its own, `pruned_model` None)
        module = adapter.layers(pruned_model)[new_idx]
    from ..placement import placement_of

    if placement_of(dense_model) == "device":  # offload / disk: each layer moves in when it runs
        dense_model.to(device)
    dense_model.eval()
    module.to(device)
    owner = pruned_model if pruned_model is not None else module

    flags = {id(p): p.requires_grad for p in owner.parameters()}
    for p in owner.parameters():
        p.requires_grad_(False)
    params = list(module.parameters())
    for p in params:
        p.requires_grad_(True)
    skip = s.loss_skip_tokens
    cache: dict | None = {} if s.cache_targets else None

    def teacher(key, ids: torch.Tensor):
        if cache is not None and key in cache:
            return cache[key]
        out = block_io(dense_model, adapter, ids.to(device), start, end)
        if cache is not None:
            cache[key] = out
        return out

    def mse(x, kw, y) -> torch.Tensor:
        out = _first(module(x, **kw))
        return torch.nn.functional.mse_loss(out[:, skip:].float(), y[:, skip:].float())

    val_batches = [val_ids[b : b + s.batch_size] for b in range(0, val_ids.shape[0], s.batch_size)]

    @torch.no_grad()
    def validate() -> float:
        was = module.training
        module.eval()
        tot, n = 0.0, 0
        for i, chunk in enumerate(val_batches):
            tot += float(mse(*teacher(("val", i), chunk))) * chunk.shape[0]
            n += chunk.shape[0]
        module.train(was)
        return tot / n

    opt = torch.optim.AdamW(params, lr=s.lr, betas=tuple(s.betas), weight_decay=s.weight_decay)
    g = torch.Generator().manual_seed(s.seed)
    t0 = time.perf_counter()
    before = validate()
    best, best_step = before, 0
    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    loss_curve, lr_curve, val_curve = [], [], [(0, before)]
    n_tr = tr_ids.shape[0]
    fixed = [list(range(b, min(b + s.batch_size, n_tr))) for b in range(0, n_tr, s.batch_size)]
    order: list = []
    try:
        module.train()
        for step in range(s.steps):
            if cache is not None:  # fixed batches (so cached targets can be reused), shuffled per epoch
                if not order:
                    order = torch.randperm(len(fixed), generator=g).tolist()
                bi = order.pop(0)
                x, kw, y = teacher(("train", bi), tr_ids[fixed[bi]])
            else:  # fresh random batches of blocks, targets recomputed every step
                if len(order) < min(s.batch_size, n_tr):
                    order += torch.randperm(n_tr, generator=g).tolist()
                pick, order = order[: s.batch_size], order[s.batch_size :]
                x, kw, y = teacher(None, tr_ids[pick])
            lr = lr_at(step, s.steps, s)
            for grp in opt.param_groups:
                grp["lr"] = lr
            loss = mse(x, kw, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            opt.step()
            loss_curve.append(float(loss.detach()))
            lr_curve.append(lr)
            if progress:
                progress(step + 1, s.steps, loss_curve[-1])
            if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
                v = validate()
                val_curve.append((step + 1, v))
                if v < best:
                    best, best_step = v, step + 1
                    best_state = {k: t.detach().clone() for k, t in module.state_dict().items()}
    finally:
        module.load_state_dict(best_state)
        module.eval()
        for p in owner.parameters():
            p.requires_grad_(flags.get(id(p), True))
    return {
        "kind": kind,
        "block": [start, end],
        "loss_curve": loss_curve,
        "lr_curve": lr_curve,
        "val_curve": val_curve,
        "val_mse_before": before,
        "val_mse_after": best,
        "best_step": best_step,
        "seconds": time.perf_counter() - t0,
        "train_tokens": s.steps * min(s.batch_size, n_tr) * int(tr_ids.shape[1]),
    }


def replacement_recover(
    pruned_model: nn.Module,
    tokenizer,
    train_ids: torch.Tensor,
    settings: StreamlineSettings | dict | None,
    dense_model: nn.Module,
    plan: PrunePlan,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, dict]:
    """The recovery step for LLM-Streamline: `train_replacement` with the pipeline's call shape
    (model, tokenizer, train ids, settings) -> (model, info). `train_ids` may be [N, T] blocks or a
    1-D token stream, cut into `seq_len` blocks (the first `max_blocks` of them when set)."""
    s = settings if isinstance(settings, StreamlineSettings) else _recovery_settings(settings)
    if train_ids.dim() == 1:
        n = train_ids.numel() // s.seq_len
        train_ids = train_ids[: n * s.seq_len].view(n, s.seq_len)
    if s.max_blocks is not None:
        train_ids = train_ids[: s.max_blocks]
    info = train_replacement(dense_model, pruned_model, plan, train_ids, s, device=device)
    return pruned_model, info


def prune(
    model: nn.Module,
    adapter: Adapter,
    calib_ids: torch.Tensor,
    ratio: float | None,
    settings: StreamlineSettings | dict | None,
    device: torch.device | str = "cpu",
) -> PrunePlan:
    """The pipeline's prune step for LLM-Streamline (capture, score, select, and train the
    replacement on the calibration blocks). The trained weights are written back into layer l* of
    `model` (for `ffn`: its MLP and post-attention norm), so that surgery with the returned plan
    builds the trained replacement. `steps: 0` (or replacement none/collapse) trains nothing."""
    from ..capture import capture_stats

    s = settings if isinstance(settings, StreamlineSettings) else _recovery_settings(settings)
    # only the block size this ratio compares is kept during capture (cos[l, l+m]; the rest stays 0)
    n = _depth_budget(model, adapter, ratio, s.n_layers)[3]
    span = n if s.replacement == "none" else n + 1
    stats = capture_stats(
        model, adapter, calib_ids, requests={"cosine"}, device=device, batch_size=s.batch_size, cosine_span=span
    )
    plan = select(model, adapter, score(model, adapter, stats, s), ratio, s)
    if s.replacement in ("layer", "ffn") and s.steps > 0:
        # no model copy: the replacement is built from a copy of layer l* alone, the frozen teacher
        # is `model` itself (its forward brings each layer in under placement offload / disk)
        from ..placement import resident

        new_idx, start, _, kind = replacement_of(plan)
        target = adapter.layers(model)[start]
        with resident(target):
            module = copy.deepcopy(target) if kind == "layer" else ffn_from_layer(adapter, target)
        for mod in module.modules():  # a copy of a placed layer is an ordinary module
            mod.__dict__.pop("_pf_home", None)
            mod._forward_hooks.clear()
            mod._forward_pre_hooks.clear()
        low = next(module.parameters()).dtype != torch.float32
        trainee = _Fp32(module.float()) if low else module  # fp32 master weights for bf16 / fp16 models
        info = train_replacement(model, None, plan, calib_ids, s, device=device, module=trainee)
        with resident(target, write_back=True), torch.no_grad():
            if kind == "layer":
                target.load_state_dict(module.state_dict())
            else:
                adapter.mlp(target).load_state_dict(module.mlp.state_dict())
                getattr(target, _ffn_norm_name(adapter)).load_state_dict(module.norm.state_dict())
        plan.notes["training"] = {k: v for k, v in info.items() if k != "lr_curve"}
        del module
    return plan


class _Fp32(nn.Module):
    """Runs an fp32 module on low-precision inputs (hidden states and floating keyword tensors cast)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, *args, **kwargs):
        def up(v):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return v.float()
            if isinstance(v, tuple):
                return tuple(up(x) for x in v)
            return v

        return self.inner(up(hidden_states), *args, **{k: up(v) for k, v in kwargs.items()})


def _recovery_settings(raw: dict | None) -> StreamlineSettings:
    from pydantic import ValidationError

    try:
        return StreamlineSettings(**(raw or {}))
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        accepted = (
            "one of " + ", ".join(sorted(StreamlineSettings.model_fields))
            if err["type"] == "extra_forbidden"
            else err["msg"]
        )
        raise ConfigError(f"recovery.settings.{loc}", err.get("input"), accepted) from None


# ------------------------------------------------------------------------------------------------
# registration

_register_layer_kind()

register(
    Method(
        name="llm-streamline",
        summary="remove the most redundant block of consecutive layers (hidden-state cosine); "
        "replace it by one trained layer or residual FFN",
        settings=StreamlineSettings,
        paper="Chen et al., Streamlining Redundant Layers to Compress LLMs, ICLR 2025 (arXiv 2403.19135)",
        targets=("layers",),
        needs=frozenset({"cosine"}),
        score=score,
        select=select,
        prune=prune,  # the pipeline trains the replacement inside the prune step (recovery: replacement)
        default_recovery="replacement",
    )
)

register(
    Method(
        name="shortgpt",
        summary="remove the layers with the lowest Block Influence 1 - cos(x_l, x_l+1)",
        settings=ShortGPTSettings,
        paper="Men et al., ShortGPT: Layers in LLMs are More Redundant Than You Expect (arXiv 2403.03853)",
        targets=("layers",),
        needs=frozenset({"cosine"}),
        score=score,
        select=select_shortgpt,
        baseline_of=("llm-streamline",),
    )
)
