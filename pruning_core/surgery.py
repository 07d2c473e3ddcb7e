"""Surgery: apply a PrunePlan to a model, physically.

Heads: q/k/v rows and o_proj columns of removed heads are sliced out (GQA: whole KV groups, or the
same number of query heads per kept group). FFN channels: gate/up rows (OPT: fc1 rows + bias) and
down (fc2) columns. Layers: removed from the ModuleList; kept layers get consecutive `layer_idx`
(their KV-cache slots) and the config's layer count / per-layer lists follow. A replacement
(LLM-Streamline) is built by the layer kind registered under its name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .adapters import Adapter, LayerShape, adapter_for
from .errors import ConfigError
from .plan import PrunePlan


@dataclass(frozen=True)
class LayerKind:
    """A non-standard decoder-layer module (e.g. a residual FFN replacing a block of layers).

    from_plan(model, adapter, layer, spec) -> module : build it during surgery (spec = plan replacement dict)
    describe(module) -> dict                      : what the loader needs to rebuild it (saved in config)
    empty(config, desc) -> module                 : an uninitialised module of that shape, for loading
    """

    name: str
    from_plan: Callable
    describe: Callable
    empty: Callable


LAYER_KINDS: dict[str, LayerKind] = {}


def register_layer_kind(kind: LayerKind) -> LayerKind:
    LAYER_KINDS[kind.name] = kind
    return kind


def _layer_kind(name: str) -> LayerKind:
    from . import methods

    methods._load_all()  # methods register their kinds on import
    if name not in LAYER_KINDS:
        raise ConfigError("plan.replacement.kind", name, ", ".join(sorted(LAYER_KINDS)) or "no kinds registered")
    return LAYER_KINDS[name]


def count_params(model: nn.Module) -> int:
    """Parameters, tied tensors counted once."""
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def set_layers(model: nn.Module, adapter: Adapter, new_layers: list[nn.Module]) -> None:
    """Replace the decoder's layer list, renumber KV-cache slots and fix the config."""
    config = model.config
    dec = adapter.decoder(model)
    kept_types = None
    if getattr(config, "layer_types", None) is not None:
        old = list(adapter.layers(model))
        types = list(config.layer_types)
        kept_types = [types[old.index(m)] if m in old and old.index(m) < len(types) else types[0] for m in new_layers]
    dec.layers = nn.ModuleList(new_layers)
    adapter.renumber(model)
    config.num_hidden_layers = len(new_layers)
    if kept_types is not None:
        config.layer_types = kept_types


def apply_layer_plan(model: nn.Module, adapter: Adapter, layer: nn.Module, lp) -> nn.Module:
    """The layer after `lp` (a kept layer's plan): pruned in place, or its replacement module."""
    if lp.replacement and lp.replacement.get("kind") not in (None, "layer"):
        return _layer_kind(lp.replacement["kind"]).from_plan(model, adapter, layer, lp.replacement)
    if getattr(layer, "pruneflow_kind", "decoder") == "decoder":
        shape = adapter.layer_shape(model, layer)
        if lp.heads is not None or lp.kv_heads is not None:
            keep_q = list(range(shape.n_heads)) if lp.heads is None else list(lp.heads)
            keep_kv = list(range(shape.n_kv_heads)) if lp.kv_heads is None else list(lp.kv_heads)
            if len(keep_q) != shape.n_heads or len(keep_kv) != shape.n_kv_heads:
                adapter.prune_heads(model, layer, keep_q, keep_kv)
        if lp.ffn is not None and len(lp.ffn) != shape.ffn:
            adapter.prune_ffn(layer, list(lp.ffn))
    return layer


def apply_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Physically remove what `plan` drops. Modifies and returns `model`; updates its config.
    (A model whose layers live off the device or on disk: `placement.save_streaming` does the same
    layer by layer while writing the checkpoint.)"""
    adapter = adapter_for(model)
    layers = list(adapter.layers(model))
    if len(plan.layers) != len(layers):
        raise ConfigError("plan.layers", len(plan.layers), f"one entry per decoder layer ({len(layers)})")
    kept: list[nn.Module] = [apply_layer_plan(model, adapter, layer, lp)
                             for lp, layer in zip(plan.layers, layers) if lp.keep]
    if not kept:
        raise ConfigError("plan.layers", "all removed", "a plan that keeps at least one layer")
    set_layers(model, adapter, kept)
    sync_config(model)
    return model


def layer_descriptions(model: nn.Module) -> list[dict]:
    adapter = adapter_for(model)
    out = []
    for layer in adapter.layers(model):
        kind = getattr(layer, "pruneflow_kind", "decoder")
        if kind == "decoder":
            s: LayerShape = adapter.layer_shape(model, layer)
            out.append({"kind": "decoder", "n_heads": s.n_heads, "n_kv_heads": s.n_kv_heads, "ffn": s.ffn})
        else:
            out.append({"kind": kind, **_layer_kind(kind).describe(layer)})
    return out


def sync_config(model: nn.Module) -> bool:
    """Make the config describe the current shapes. Returns True when stock transformers can
    rebuild the model from it (uniform layers), else records per-layer sizes in
    `config.pruneflow_layers` for `checkpoint.load_pruned`."""
    adapter = adapter_for(model)
    config = model.config
    shapes = adapter.shapes(model)
    stock = adapter.stock_config(config, shapes)
    if stock is not None:
        stock.pop("layer_types", None)
        for k, v in stock.items():
            setattr(config, k, v)
        if hasattr(config, "pruneflow_layers"):
            delattr(config, "pruneflow_layers")
        return True
    config.pruneflow_layers = layer_descriptions(model)
    if getattr(config, "head_dim", None) is None and adapter.family == "llama":
        config.head_dim = adapter.head_dim(model)
    return False
