"""Training LLM-Streamline's replacement (Chen et al., ICLR 2025, arXiv 2403.19135, Eq. 3): with the
rest of the model frozen, minimise mean ||f_θ(x^(l*)) − x^(l*+m)||² over calibration tokens.

Inputs and targets are computed on the fly by the frozen dense prefix, and the replacement is called
with the exact keyword arguments the real model passes to layer l* (causal mask, rotary
`position_embeddings`) — never `attention_mask=None`, which is bidirectional attention. The cosine
schedule decays per optimiser step down to its floor; the best weights on validation are copied.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from ...adapters import Adapter, adapter_for
from ...errors import ConfigError, DataError
from ...layer_io import first_output
from ...plan import PrunePlan
from .settings import StreamlineSettings


class _Stop(Exception):
    pass


def _layer_call(args, kwargs) -> tuple[torch.Tensor, dict]:
    """(hidden states, keyword arguments) a decoder layer was called with, without the KV cache."""
    kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
    kw["use_cache"] = False
    return (args[0] if args else kwargs["hidden_states"]), kw


@torch.no_grad()
def block_io(dense: nn.Module, adapter: Adapter, ids: torch.Tensor, start: int, end: int):
    """Run the frozen dense model on `ids` up to layer end−1 and return (x^(start), kwargs, x^(end)):
    the block's input, the keyword arguments the real forward passes to layer `start` (causal mask,
    rotary position_embeddings, position_ids...) and the block's output, before any final norm."""
    layers = adapter.layers(dense)
    got: dict = {}

    def pre(mod, args, kwargs):
        got["x"], got["kw"] = _layer_call(args, kwargs)

    def post(mod, args, kwargs, out):
        got["y"] = first_output(out)
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


@torch.no_grad()
def prefix_block_io(pruned: nn.Module, adapter: Adapter, index: int, block: list[nn.Module], ids: torch.Tensor):
    """`block_io` without the dense model: the pruned model's layers before the replacement (index
    `index`) are the dense model's layers before the removed block, unchanged, so the pruned prefix
    gives x^(start) and the keyword arguments; the dense `block` layers, run in order on it, give
    x^(end). Only the block's layers of the dense model need to be in memory."""
    got: dict = {}

    def pre(mod, args, kwargs):
        got["x"], got["kw"] = _layer_call(args, kwargs)
        raise _Stop

    h = adapter.layers(pruned)[index].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        pruned(input_ids=ids, use_cache=False)
    except _Stop:
        pass
    finally:
        h.remove()
    y = got["x"]
    for layer in block:
        y = first_output(layer(y, **got["kw"]))
    return got["x"], got["kw"], y


def _fp32(kw):
    """The layer's keyword arguments with floating tensors (rotary tables, additive masks) in fp32, the
    dtype the replacement trains in."""
    if isinstance(kw, dict):
        return {k: _fp32(v) for k, v in kw.items()}
    if isinstance(kw, (tuple, list)):
        return type(kw)(_fp32(v) for v in kw)
    if isinstance(kw, torch.Tensor) and kw.is_floating_point():
        return kw.float()
    return kw


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
    (no_grad), with the real model's causal mask and rotary embeddings. `dense_model` may instead be
    the list of the removed block's dense layers [l*, l*+m): the pruned model's own prefix then gives
    the inputs (`prefix_block_io`, the same numbers) and no second model is held. `train_ids` [N, T] token
    blocks; the first `val_fraction` of them (at least one) is held out for validation. Everything
    but the replacement stays frozen. Returns {"loss_curve", "lr_curve", "val_curve" [(step, mse)],
    "val_mse_before", "val_mse_after", "best_step", "seconds", "train_tokens"}; the weights with the
    best validation MSE are kept."""
    s = settings if isinstance(settings, StreamlineSettings) else StreamlineSettings(**(settings or {}))
    device = torch.device(device)
    block = list(dense_model) if isinstance(dense_model, (list, tuple, nn.ModuleList)) else None
    new_idx, start, end, kind = replacement_of(plan)
    if block is not None and (len(block) != end - start or pruned_model is None):
        raise ConfigError("recovery", f"{len(block)} dense layers", f"the {end - start} layers of the removed "
                          f"block [{start}, {end}) and the pruned model")
    adapter = adapter_for(pruned_model if block is not None else dense_model)
    if train_ids.dim() != 2 or train_ids.shape[0] < 2:
        raise DataError("recovery.train_ids", tuple(train_ids.shape), "[N, T] token blocks with N >= 2")
    n_val = max(1, round(train_ids.shape[0] * s.val_fraction))
    val_ids, tr_ids = train_ids[:n_val], train_ids[n_val:]
    from ...engine import keep_resident
    from ...residency import placement_of

    if module is None:  # the replacement inside a pruned model (else: given on its own, `pruned_model` None)
        module = adapter.layers(pruned_model)[new_idx]
    keep_resident(module, device)  # offload / disk: the trained layer stays resident on the device
    if block is not None:
        for layer in block:
            layer.to(device).eval()
            for p in layer.parameters():
                p.requires_grad_(False)
        if placement_of(pruned_model) == "device":  # the replacement's inputs come from its own prefix
            pruned_model.to(device)
    else:
        if placement_of(dense_model) == "device":  # offload / disk: each layer moves in when it runs
            dense_model.to(device)
        dense_model.eval()
    work_dtype = next(module.parameters()).dtype
    module.to(device=device, dtype=torch.float32)  # fp32 master weights; back to the model's dtype at the end
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
        if block is not None:
            out = prefix_block_io(pruned_model, adapter, new_idx, block, ids.to(device))
        else:
            out = block_io(dense_model, adapter, ids.to(device), start, end)
        if cache is not None:
            cache[key] = out
        return out

    def mse(x, kw, y) -> torch.Tensor:
        out = first_output(module(x.float(), **_fp32(kw)))
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
        module.to(dtype=work_dtype)
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
