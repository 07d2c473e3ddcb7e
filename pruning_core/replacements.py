"""Replacement layers: modules that take the place of a block of decoder layers, and the registry of
layer kinds that `surgery.apply_plan` builds and `checkpoint.load_pruned` rebuilds.

* `ffn` — LLM-Streamline's lightweight replacement (Chen et al., "Streamlining Redundant Layers to
  Compress Large Language Models", ICLR 2025, arXiv 2403.19135) in residual form x + MLP(norm(x)),
  initialised from the first replaced layer's MLP and post-attention norm. Saved with its FFN size
  in `config.pruneflow_layers`.
* `collapse` — LaCo's Reserving-Differences-while-Seeking-Common merge (Yang et al., "LaCo: Large
  Language Model Pruning via Layer Collapse", 2024): θ = θ_0 + Σ_k (θ_k − θ_0) over the block. The
  result is an ordinary decoder layer, so it is never described or rebuilt.

A layer kind is data for surgery and the loader, not a method: it lives here so that both always
find it, whichever method produced the plan.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter, adapter_for, stock_layer
from .errors import ConfigError


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


def layer_kind(name: str) -> LayerKind:
    if name not in LAYER_KINDS:
        raise ConfigError("plan.replacement.kind", name, ", ".join(sorted(LAYER_KINDS)))
    return LAYER_KINDS[name]


def ffn_norm_name(adapter: Adapter) -> str:
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
    norm = copy.deepcopy(getattr(layer, ffn_norm_name(adapter)))
    ffn = ResidualFFN(norm, copy.deepcopy(adapter.mlp(layer)))
    p = next(layer.parameters())
    return ffn.to(device=p.device, dtype=p.dtype)


def attention_free(adapter: Adapter, layer: nn.Module) -> ResidualFFN:
    """`layer` without its attention sub-block (a searched plan's attention-free layer, `search.drop_blocks`):
    x + MLP(ffn_norm(x)) from the layer's own modules (no copy; the attention and its norm are dropped).
    Exact when the attention's output was zero (its o_proj weight and bias zeroed)."""
    return ResidualFFN(getattr(layer, ffn_norm_name(adapter)), adapter.mlp(layer))


def _ffn_empty(config, desc: dict) -> ResidualFFN:
    adapter = adapter_for(config)
    cfg = copy.deepcopy(config)
    if "ffn" in desc:
        setattr(cfg, adapter.ffn_sizes_key(), int(desc["ffn"]))
    if hasattr(cfg, "pruneflow_layers"):
        delattr(cfg, "pruneflow_layers")
    layer = stock_layer(cfg, device="cpu")
    return ResidualFFN(getattr(layer, ffn_norm_name(adapter)), adapter.mlp(layer))


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


register_layer_kind(LayerKind(
    name="ffn",
    from_plan=lambda model, adapter, layer, spec: ffn_from_layer(adapter, layer),
    describe=_ffn_describe,
    empty=_ffn_empty,
))
register_layer_kind(LayerKind(name="collapse", from_plan=_collapse_from_plan, describe=_not_saved, empty=_not_saved))
