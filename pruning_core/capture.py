"""Layer-wise streaming through the decoder, and the statistics methods ask for.

`capture_stats` is a consumer of one pass of the layer engine (`engine.run_pass`); it accumulates, per layer (keys of the returned flat dict):

=====================  ===================================================================
`layer.{i}.attn_gram`  sum of x xᵀ over tokens, x = input of `o_proj` (request "attn_gram")
`layer.{i}.mlp_gram`   same for the input of `down_proj` / `fc2` (request "mlp_gram")
`layer.{i}.attn_in_sq` / `attn_in_sum`   per-channel sum of squares / sum of the o_proj input
`layer.{i}.mlp_in_sq` / `mlp_in_sum`     same for the down_proj input (the FFN channels)
`layer.{i}.mlp_out_sq` per-feature sum of squares of the down_proj / fc2 output (d_model)
`layer.{i}.up_out_sq`  per-channel sum of squares of the up_proj (OPT: fc1) output
`layer.{i}.attn_x_sq`  per-feature sum of squares of the (normed) input of q/k/v
`layer.{i}.mlp_x_sq`   per-feature sum of squares of the (normed) input of gate/up (fc1)
`cosine`               [L+1, L+1]: mean over tokens of cos(h_i, h_j), h_i = input of layer i,
                       h_L = output of the last layer before the final norm (request "cosine")
`tokens`               number of calibration tokens
=====================  ===================================================================

The norm-type vectors are always collected (they are cheap); Gram matrices and cosines on request.
Sums, not means: divide by `tokens` (sums from several runs can be added).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .adapters import Adapter
from .engine import run_pass
from .layer_io import LayerStep

REQUESTS = frozenset({"norms", "attn_gram", "mlp_gram", "cosine"})  # "norms": the cheap vectors only


class Accumulator:
    """Running sums over calibration tokens in `dtype` (fp32 or fp64), one entry per key: per-feature
    sums (`vec(square=False)`), sums of squares (`vec`), Gram matrices Σ x xᵀ (`gram`). `rows[key]`
    counts the token rows added. Inputs [..., d] are flattened to rows; sums stay on x's device."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        self.data: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    def _rows(self, key: str, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, x.shape[-1]).to(self.dtype)
        self.rows[key] = self.rows.get(key, 0) + x.shape[0]
        return x

    def add(self, key: str, value: torch.Tensor) -> None:
        if key in self.data:
            self.data[key] += value
        else:
            self.data[key] = value.clone()

    def vec(self, key: str, x: torch.Tensor, square: bool = True) -> None:
        x = self._rows(key, x)
        self.add(key, (x * x).sum(0) if square else x.sum(0))

    def gram(self, key: str, x: torch.Tensor) -> None:
        x = self._rows(key, x)
        if key in self.data:
            self.data[key].addmm_(x.T, x)
        else:
            self.data[key] = x.T @ x

    def gram_hook(self, key: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
        """A stream hook fn(input, output) adding the input's Gram matrix."""
        return lambda x, _y: self.gram(key, x)

    def moments_hook(self, key: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
        """A stream hook fn(input, output) adding the input's per-feature sum and sum of squares."""

        def hook(x, _y):
            self.vec(key + ".sum", x, square=False)
            self.vec(key + ".sq", x)

        return hook

    def moments(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, sample variance, sum of squares) per feature of what `moments_hook(key)` saw."""
        n = self.rows[key + ".sq"]
        mean = self.data[key + ".sum"] / n
        var = (self.data[key + ".sq"] - n * mean * mean) / max(n - 1, 1)
        return mean, var.clamp_min(0), self.data[key + ".sq"]


def stat_hooks(adapter: Adapter, acc: Accumulator, prefix: str, requests: frozenset[str]) -> dict[str, Callable]:
    """The hooks `capture_stats` puts on one layer (reusable by methods that stream themselves)."""
    a = adapter

    def channels(part: str, x) -> None:  # o_proj / down_proj input: sums of squares, sums, Gram
        acc.vec(f"{prefix}{part}_in_sq", x)
        acc.vec(f"{prefix}{part}_in_sum", x, square=False)
        if f"{part}_gram" in requests:
            acc.gram(f"{prefix}{part}_gram", x)

    def on_o(x, _y):
        channels("attn", x)

    def on_down(x, y):
        acc.vec(prefix + "mlp_out_sq", y)
        channels("mlp", x)

    def on_up(x, y):
        acc.vec(prefix + "mlp_x_sq", x)
        acc.vec(prefix + "up_out_sq", y)

    def on_q(x, _y):
        acc.vec(prefix + "attn_x_sq", x)

    up = a.mlp_in[-1]
    return {
        a.module_name(a.o): on_o,
        a.module_name(a.mlp_out): on_down,
        a.module_name(up): on_up,
        a.module_name(a.q): on_q,
    }


@torch.no_grad()
def capture_stats(
    model: nn.Module,
    adapter: Adapter,
    input_ids: torch.Tensor,
    requests: frozenset[str] | set[str] = frozenset(),
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    stat_dtype: torch.dtype = torch.float32,
    offload: bool | None = None,
    cosine_span: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Stream the calibration blocks through the model and return the statistics (see module doc)."""
    requests = frozenset(requests)
    unknown = requests - REQUESTS
    if unknown:
        from .errors import ConfigError

        raise ConfigError("capture.requests", sorted(unknown), ", ".join(sorted(REQUESTS)))
    acc = Accumulator(stat_dtype)
    n_layers = len(adapter.layers(model))
    cons = StatsConsumer(adapter, acc, requests, n_layers, int(input_ids.numel()), cosine_span)
    run_pass(model, adapter, [cons], input_ids, device=device, batch_size=batch_size, offload_acts=offload,
             progress=progress)
    return cons.result()


class StatsConsumer:
    """The engine consumer behind `capture_stats`: the statistics hooks on each layer's forward, and
    the cosines between the hidden states (unit-normalised fp32 on the host, only `span` kept)."""

    def __init__(self, adapter: Adapter, acc: Accumulator, requests: frozenset[str], n_layers: int,
                 n_tokens: int, cosine_span: int | None = None):
        self.adapter, self.acc, self.requests, self.n_tokens = adapter, acc, requests, n_tokens
        self.want_cos = "cosine" in requests
        self.span = n_layers if cosine_span is None else int(cosine_span)
        self.cos = torch.zeros(n_layers + 1, n_layers + 1, dtype=torch.float64)
        self.ring: list[tuple[int, list[torch.Tensor]]] = []

    def _push(self, idx: int, states: list[torch.Tensor]) -> None:
        normed = [torch.nn.functional.normalize(s.float(), dim=-1).to("cpu") for s in states]
        for j, prev in self.ring:
            tot = sum(float((p * n).sum(dtype=torch.float64)) for p, n in zip(prev, normed))
            self.cos[j, idx] = self.cos[idx, j] = tot / self.n_tokens
        self.cos[idx, idx] = 1.0
        self.ring.append((idx, normed))
        while len(self.ring) > self.span:
            self.ring.pop(0)

    def begin(self, step: LayerStep) -> None:
        if self.want_cos and step.index == 0:
            self._push(0, step.inputs)

    def observe(self, step: LayerStep) -> dict:
        return stat_hooks(self.adapter, self.acc, f"layer.{step.index}.", self.requests)

    def after(self, step: LayerStep) -> bool:
        if self.want_cos:
            self._push(step.index + 1, step.outputs)
        return False

    def result(self) -> dict[str, torch.Tensor]:
        out = {k: v.cpu() for k, v in self.acc.data.items()}
        if self.want_cos:
            out["cosine"] = self.cos.float()
        out["tokens"] = torch.tensor(self.n_tokens)
        return out
