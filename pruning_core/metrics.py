"""Perplexity (protocol named), parameter and FLOP accounting."""

from __future__ import annotations

import math

import torch
from torch import nn

from .adapters import adapter_for
from .plan import PrunePlan


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int = 256, max_windows: int | None = None,
               batch_size: int = 1, device: torch.device | str | None = None) -> dict:
    """Fixed-window perplexity (the SparseGPT/Wanda protocol): the token stream is cut into
    non-overlapping windows of `seq_len`, each scored on its own; PPL = exp(mean NLL over every
    predicted token)."""
    from .errors import DataError

    ids = ids.reshape(-1)
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, int(max_windows))
    if n < 1:
        raise DataError("evaluation.seq_len", seq_len, f"at most {ids.numel()} tokens (the evaluation text's length)")
    if device is None:
        device = next(model.parameters()).device
    windows = ids[: n * seq_len].view(n, seq_len)
    total, count = 0.0, 0
    model.eval()
    from .residency import placement_of

    placement = placement_of(model)
    for x, logits in _window_logits(model, windows, batch_size, torch.device(device), placement):
        logits = logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count, "windows": n,
            "protocol": f"fixed_window_{seq_len}"}


def _window_logits(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device, placement: str):
    """(window batch, logits) per batch. `device`: whole-model forwards. `offload` / `disk`: layer-major —
    one pass of the layer engine takes every window through layer i before layer i+1, so each layer is
    read once per evaluation, not once per batch; then the final norm and head run per batch (the same
    operations on the same batches, so the same numbers)."""
    if placement == "device":
        for b in range(0, windows.shape[0], batch_size):
            x = windows[b:b + batch_size].to(device)
            yield x, model(input_ids=x, use_cache=False).logits
        return
    from .engine import run_pass
    from .layer_io import _place_non_layers, _restore

    adapter = adapter_for(model)
    res = run_pass(model, adapter, [], windows, device=device, batch_size=batch_size, keep_final=True)
    layers = adapter.layers(model)
    originals = list(layers)
    placed = _place_non_layers(model, adapter, device)
    try:
        for j, b in enumerate(range(0, windows.shape[0], batch_size)):
            x = windows[b:b + batch_size].to(device)
            for i, layer in enumerate(originals):
                layers[i] = _Replay(layer, res.final_hidden[j].to(device) if i == 0 else None)
            try:
                yield x, model(input_ids=x, use_cache=False).logits
            finally:
                for i, layer in enumerate(originals):
                    layers[i] = layer
            res.final_hidden[j] = None
    finally:
        _restore(placed)


class _Replay(nn.Module):
    """Stands in for a decoder layer whose output is already known: the first returns the last layer's
    output, the others pass it on, so the model's own final norm and head compute the logits."""

    def __init__(self, inner: nn.Module, out: torch.Tensor | None):
        super().__init__()
        self.out = out
        for a in ("attention_type", "layer_idx"):
            if hasattr(inner, a):
                setattr(self, a, getattr(inner, a))

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.out is None else self.out


def attention_block_params(adapter, layer) -> int:
    """Parameters an attention-free layer loses: everything but its MLP and the norm before it."""
    from .replacements import ffn_norm_name
    from .surgery import count_params

    return count_params(layer) - count_params(adapter.mlp(layer)) - count_params(getattr(layer, ffn_norm_name(adapter)))


def _lin(o: int, i: int, bias: bool) -> int:
    return o * i + (o if bias else 0)


def plan_params(model: nn.Module, plan: PrunePlan) -> tuple[int, int]:
    """(params before, params after) of applying `plan`, computed from shapes without touching weights."""
    from .surgery import count_params

    adapter = adapter_for(model)
    before = count_params(model)
    after = before
    hd = adapter.head_dim(model)
    for lp, layer in zip(plan.layers, adapter.layers(model)):
        if not lp.keep:
            after -= sum(p.numel() for p in layer.parameters())
            continue
        if getattr(layer, "pruneflow_kind", "decoder") != "decoder":
            continue
        after -= _layer_delta(model, adapter, layer, lp, hd)
    return before, after


def flops_per_token(model: nn.Module, context: int = 0) -> int:
    """Forward FLOPs per token: 2 x (weights of every Linear, lm_head included) + attention
    scores/values over `context` previous tokens (2 x 2 x heads x head_dim x context per layer)."""
    adapter = adapter_for(model)
    lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    attn = 0
    if context:
        for layer in adapter.layers(model):
            if getattr(layer, "pruneflow_kind", "decoder") == "decoder":
                s = adapter.layer_shape(model, layer)
                attn += 4 * s.n_heads * s.head_dim * context
    return 2 * lin + attn


def layer_table(model: nn.Module, plan: PrunePlan | None = None, context: int = 0) -> list[dict]:
    """Per-layer params and FLOPs/token before (and after `plan`), without touching weights."""
    adapter = adapter_for(model)
    hd = adapter.head_dim(model)
    rows = []
    for i, layer in enumerate(adapter.layers(model)):
        s = adapter.layer_shape(model, layer)
        params = sum(p.numel() for p in layer.parameters())
        lin = sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
        row = {"layer": i, "heads": s.n_heads, "kv_heads": s.n_kv_heads, "ffn": s.ffn, "params": params,
               "flops": 2 * lin + 4 * s.n_heads * hd * context}
        if plan is not None:
            lp = plan.layers[i]
            if not lp.keep:
                row.update(heads_after=0, kv_heads_after=0, ffn_after=0, params_after=0, flops_after=0)
            else:
                nq = s.n_heads if lp.heads is None else len(lp.heads)
                nkv = s.n_kv_heads if lp.kv_heads is None else len(lp.kv_heads)
                f = s.ffn if lp.ffn is None else len(lp.ffn)
                pa = params - _layer_delta(model, adapter, layer, lp, hd)
                frac = pa / params if params else 1.0
                row.update(heads_after=nq, kv_heads_after=nkv, ffn_after=f, params_after=pa,
                           flops_after=int(2 * lin * frac) + 4 * nq * hd * context)
        rows.append(row)
    return rows


def _layer_delta(model, adapter, layer, lp, hd) -> int:
    s = adapter.layer_shape(model, layer)
    d = 0
    if lp.heads == [] and lp.kv_heads == []:  # attention-free: only the FFN norm and the MLP stay
        d = attention_block_params(adapter, layer)
        lp = type(lp)(lp.index, ffn=lp.ffn)
        d += _layer_delta(model, adapter, layer, lp, hd)
        return d
    q, k, v, o = (adapter.proj(layer, n) for n in (adapter.q, adapter.k, adapter.v, adapter.o))
    nq = s.n_heads if lp.heads is None else len(lp.heads)
    nkv = s.n_kv_heads if lp.kv_heads is None else len(lp.kv_heads)
    hid = q.in_features
    d += _lin(q.out_features, hid, q.bias is not None) - _lin(nq * hd, hid, q.bias is not None)
    for lin in (k, v):
        d += _lin(lin.out_features, hid, lin.bias is not None) - _lin(nkv * hd, hid, lin.bias is not None)
    d += (o.in_features - nq * hd) * o.out_features
    if lp.ffn is not None:
        dd = s.ffn - len(lp.ffn)
        for name in adapter.mlp_in:
            lin = adapter.proj(layer, name)
            d += dd * lin.in_features + (dd if lin.bias is not None else 0)
        d += dd * adapter.proj(layer, adapter.mlp_out).out_features
    return d
