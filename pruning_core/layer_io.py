"""One decoder layer of a pass, and how its inputs are caught.

`LayerStep` is one decoder layer of a pass of the layer engine (`engine.run_pass`): the inputs of
layer i are kept, layer i is run on every calibration batch, whatever the consumers want is
accumulated by hooks, and the outputs become the inputs of layer i+1. Peak accelerator memory is one
layer plus one layer's activations, flat in the number of layers. The keyword arguments each layer
gets (rotary `position_embeddings`, causal mask, `position_ids`, ...) are caught, layer by layer, from
the real model's own forward call (`catch_inputs`), so they are exactly what the installed
transformers version passes — including a sliding-window mask for the sliding layers of a model that
mixes them with full attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .adapters import Adapter


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


@torch.no_grad()
def catch_inputs(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor, device: torch.device,
                 batch_size: int, store: torch.device) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """Layer 0's input per batch, and the keyword arguments *each* layer gets per batch (models that
    mix sliding-window and full attention pass each layer its own mask), kept on `store`. Every layer
    is swapped for a catcher that records its call and passes the hidden state on; the last raises, so
    no layer computes anything (and no layer's weights are read)."""
    layers = adapter.layers(model)
    originals = list(layers)
    n = len(originals)
    hs: list[torch.Tensor] = []
    kws: list[list[dict]] = [[] for _ in range(n)]
    batch_size = max(1, int(batch_size))

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
    placed = _place_non_layers(model, adapter, device)
    for i, layer in enumerate(originals):
        layers[i] = Catcher(layer, i)
    try:
        for b in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[b : b + batch_size].to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except _Caught:
                pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        _restore(placed)
    memo: dict[int, torch.Tensor] = {}  # tensors shared between layers (rotary tables, masks) move once
    hs = [h.to(store) for h in hs]
    kws = [[_to(k, store, memo) for k in per_layer] for per_layer in kws]
    return hs, kws


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
