"""Layer-wise streaming through the decoder, and the statistics methods ask for.

`LayerStream` runs the calibration blocks one decoder layer at a time: the inputs of layer i are
kept, layer i is (moved to the working device and) run, whatever the consumer wants is accumulated
by hooks, and the outputs become the inputs of layer i+1. Peak accelerator memory is one layer
plus one layer's activations, flat in the number of layers. The keyword arguments each layer gets
(rotary `position_embeddings`, causal mask, `position_ids`, ...) are caught, layer by layer, from the
real model's own forward call, so they are exactly what the installed transformers version passes —
including a sliding-window mask for the sliding layers of a model that mixes them with full attention.

`capture_stats` uses it to accumulate, per layer (keys of the returned flat dict):

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

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import Adapter

REQUESTS = frozenset({"norms", "attn_gram", "mlp_gram", "cosine"})  # "norms": the cheap vectors only


class _Caught(Exception):
    pass


def first_output(out):
    """A layer's hidden state, whether it returns a tensor or a tuple."""
    return out[0] if isinstance(out, tuple) else out


_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "use_cache")


def _to(obj, device, memo: dict | None = None):
    """`obj` (tensors inside tuples, lists, dicts) on `device`; `memo` moves a shared tensor once."""
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, tuple):
        return tuple(_to(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


@dataclass
class LayerStep:
    """One decoder layer in the stream; `run` pushes every calibration batch through it."""

    index: int
    layer: nn.Module
    inputs: list[torch.Tensor]
    kwargs: list[dict]
    device: torch.device
    outputs: list[torch.Tensor] | None = None
    _store: torch.device = field(default=torch.device("cpu"))

    @torch.no_grad()
    def run(
        self,
        hooks: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] | None = None,
        layer: nn.Module | None = None,
        keep_outputs: bool = True,
    ) -> list[torch.Tensor] | None:
        """Run all batches through `layer` (default: this step's layer). `hooks` maps a submodule
        path relative to the layer (e.g. "mlp.down_proj") to fn(input, output), called per batch."""
        layer = self.layer if layer is None else layer
        handles = []
        for name, fn in (hooks or {}).items():
            mod = layer.get_submodule(name)
            handles.append(mod.register_forward_hook(lambda m, a, o, fn=fn: fn(a[0].detach(), first_output(o).detach())))
        outs = []
        try:
            for h, kw in zip(self.inputs, self.kwargs):
                out = first_output(layer(h.to(self.device), **_to(kw, self.device)))
                if keep_outputs:
                    outs.append(out.to(self._store))
        finally:
            for hd in handles:
                hd.remove()
        return outs if keep_outputs else None


class LayerStream:
    """Iterate the decoder layers with their calibration inputs.

    model:       the full model (its layers may live on CPU; they are moved to `device` one at a time)
    input_ids:   [N, L] calibration token blocks
    batch_size:  blocks per forward call
    offload:     keep activations between layers on CPU (default: only when `device` is not CPU
                 and the activations would not fit comfortably)
    After the consumer's work on a step, the step's `outputs` (set by the consumer, or computed by
    running the possibly modified layer) become the next layer's inputs.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Adapter,
        input_ids: torch.Tensor,
        device: torch.device | str = "cpu",
        batch_size: int = 8,
        offload: bool = False,
        write_back: bool | None = None,
    ):
        """write_back (layers whose weights live on disk, `residency`, disk): True spills every layer
        after its step, False never (read-only consumers such as `capture_stats`), None spills the
        layers the consumer changed (a digest of the layer is compared)."""
        self.write_back = write_back
        self.model, self.adapter = model, adapter
        self.device = torch.device(device)
        self.store = torch.device("cpu") if offload else self.device
        self.input_ids = input_ids
        self.batch_size = max(1, int(batch_size))
        self.n_tokens = int(input_ids.numel())

    @torch.no_grad()
    def _catch_inputs(self) -> tuple[list[torch.Tensor], list[list[dict]]]:
        """Layer 0's input per batch, and the keyword arguments *each* layer gets per batch (models
        that mix sliding-window and full attention pass each layer its own mask). Every layer is
        swapped for a catcher that records its call and passes the hidden state on; the last raises,
        so no layer computes anything."""
        layers = self.adapter.layers(self.model)
        originals = list(layers)
        n = len(originals)
        hs: list[torch.Tensor] = []
        kws: list[list[dict]] = [[] for _ in range(n)]

        class Catcher(nn.Module):
            def __init__(self, inner, index):
                super().__init__()
                self.inner, self.index = inner, index
                # attributes transformers may read off a layer (e.g. attention_type)
                for a in ("attention_type", "layer_idx"):
                    if hasattr(inner, a):
                        setattr(self, a, getattr(inner, a))

            def forward(self, hidden_states, *args, **kwargs):
                if self.index == 0:
                    hs.append(hidden_states.detach())
                kw = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
                kw["use_cache"] = False
                kws[self.index].append(kw)
                if self.index == n - 1:
                    raise _Caught
                return hidden_states

        # move everything but the decoder layers to the working device
        placed = _place_non_layers(self.model, self.adapter, self.device)
        for i, layer in enumerate(originals):
            layers[i] = Catcher(layer, i)
        try:
            for b in range(0, self.input_ids.shape[0], self.batch_size):
                ids = self.input_ids[b : b + self.batch_size].to(self.device)
                try:
                    self.model(input_ids=ids, use_cache=False)
                except _Caught:
                    pass
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
            _restore(placed)
        memo: dict[int, torch.Tensor] = {}  # tensors shared between layers (rotary tables, masks) move once
        hs = [h.to(self.store) for h in hs]
        kws = [[_to(k, self.store, memo) for k in per_layer] for per_layer in kws]
        return hs, kws

    def __iter__(self) -> Iterator[LayerStep]:
        from .residency import bring, home_of, release

        inputs, kwargs = self._catch_inputs()
        layers = self.adapter.layers(self.model)
        for i in range(len(layers)):
            layer = layers[i]
            managed = home_of(layer) is not None  # placement offload / disk: the layer's home moves it
            if managed:
                bring(layer, self.device, track_changes=self.write_back is None)
            home = _device_of(layer)
            if not managed and home != self.device:
                layer.to(self.device)
            step = LayerStep(i, layer, inputs, kwargs[i], self.device, _store=self.store)
            yield step
            brought, layer = layer, layers[i]  # the consumer may have replaced it
            step.layer = layer
            if step.outputs is None:
                step.outputs = step.run()
            if managed:
                release(brought, write_back=self.write_back)
            elif home != self.device:
                layer.to(home)
            inputs = step.outputs
        self.final_hidden = inputs


def _device_of(mod: nn.Module) -> torch.device:
    for p in mod.parameters():
        return p.device
    return torch.device("cpu")


def _place_non_layers(model: nn.Module, adapter: Adapter, device: torch.device) -> list[tuple[nn.Module, torch.device]]:
    """Move every module outside the decoder layers to `device`; remember where they were."""
    layers = adapter.layers(model)
    layer_params = {id(p) for p in layers.parameters()}
    placed = []
    for mod in model.modules():
        own = list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))
        if not own or any(id(p) in layer_params for p in own):
            continue
        dev = own[0].device
        if dev != device:
            _move_own(mod, device)
            placed.append((mod, dev))
    return placed


def _move_own(mod: nn.Module, device: torch.device) -> None:
    for p in list(mod._parameters.values()):
        if p is not None:
            p.data = p.data.to(device)
    for n, b in list(mod._buffers.items()):
        if b is not None:
            mod._buffers[n] = b.to(device)


def _restore(placed) -> None:
    for mod, dev in placed:
        _move_own(mod, dev)


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
    offload: bool = False,
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
    stream = LayerStream(model, adapter, input_ids, device=device, batch_size=batch_size, offload=offload,
                         write_back=False)
    n_layers = len(adapter.layers(model))
    want_cos = "cosine" in requests
    span = n_layers if cosine_span is None else int(cosine_span)
    cos = torch.zeros(n_layers + 1, n_layers + 1, dtype=torch.float64)
    ring: list[tuple[int, list[torch.Tensor]]] = []

    host = torch.device("cpu")

    def push_state(idx: int, states: list[torch.Tensor]) -> None:
        # only the states the method compares are kept (span), unit-normalised fp32 on the host
        normed = [torch.nn.functional.normalize(s.float(), dim=-1).to(host) for s in states]
        for j, prev in ring:
            tot = sum(float((p * n).sum(dtype=torch.float64)) for p, n in zip(prev, normed))
            cos[j, idx] = cos[idx, j] = tot / stream.n_tokens
        cos[idx, idx] = 1.0
        ring.append((idx, normed))
        while len(ring) > span:
            ring.pop(0)

    for step in stream:
        if want_cos and step.index == 0:
            push_state(0, step.inputs)
        step.outputs = step.run(hooks=stat_hooks(adapter, acc, f"layer.{step.index}.", requests))
        if want_cos:
            push_state(step.index + 1, step.outputs)
        if progress:
            progress(step.index + 1, n_layers)
    out = {k: v.cpu() for k, v in acc.data.items()}
    if want_cos:
        out["cosine"] = cos.float()
    out["tokens"] = torch.tensor(stream.n_tokens)
    return out
