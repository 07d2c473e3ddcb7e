"""Surgery: apply a PrunePlan to a model, physically.

Heads: q/k/v rows and o_proj columns of removed heads are sliced out (GQA: whole KV groups, or the
same number of query heads per kept group). FFN channels: gate/up rows (OPT: fc1 rows + bias) and
down (fc2) columns. Layers: removed from the ModuleList; kept layers get consecutive `layer_idx`
(their KV-cache slots) and the config's layer count / per-layer lists follow. A replacement
(LLM-Streamline) is built by the layer kind registered under its name. Whole sub-blocks
(`search.drop_blocks`): a layer whose plan keeps no head (`heads == kv_heads == []`) becomes its FFN
as a residual layer (kind `ffn`); one that keeps no FFN channel (`ffn == []`) keeps zero-width MLP
projections (exact: they add nothing), which the vLLM export writes as a no-op FFN block.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import hfload
from .adapters import Adapter, LayerShape, adapter_for, stock_layer
from .errors import ConfigError
from .plan import PrunePlan
from .replacements import attention_free, layer_kind


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
        return layer_kind(lp.replacement["kind"]).from_plan(model, adapter, layer, lp.replacement)
    if getattr(layer, "pruneflow_kind", "decoder") == "decoder":
        shape = adapter.layer_shape(model, layer)
        if lp.heads == [] and lp.kv_heads == []:  # attention-free (search.drop_blocks): its FFN as a layer
            if lp.ffn == []:
                raise ConfigError(f"plan.layers[{lp.index}]", "no heads and no FFN channels",
                                  "keep: false for a layer that loses both sub-blocks")
            if lp.ffn is not None and len(lp.ffn) != shape.ffn:
                adapter.prune_ffn(layer, list(lp.ffn))
            return attention_free(adapter, layer)
        if lp.heads is not None or lp.kv_heads is not None:
            keep_q = list(range(shape.n_heads)) if lp.heads is None else list(lp.heads)
            keep_kv = list(range(shape.n_kv_heads)) if lp.kv_heads is None else list(lp.kv_heads)
            if len(keep_q) != shape.n_heads or len(keep_kv) != shape.n_kv_heads:
                adapter.prune_heads(model, layer, keep_q, keep_kv)
        if lp.ffn is not None and len(lp.ffn) != shape.ffn:
            adapter.prune_ffn(layer, list(lp.ffn), allow_empty=True)  # [] : FFN-free (search.drop_blocks)
    return layer


def apply_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Physically remove what `plan` drops. Modifies and returns `model`; updates its config.
    (A model whose layers live off the device or on disk: `checkpoint.save_streaming` does the same
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
            out.append({"kind": "decoder", "n_heads": s.n_heads, "n_kv_heads": s.n_kv_heads, "ffn": s.ffn,
                        "bias": adapter.biased(layer)})
        else:
            out.append({"kind": kind, **layer_kind(kind).describe(layer)})
    return out


def settle_biases(model: nn.Module, adapter: Adapter | None = None):
    """The config under which stock transformers builds every bias the decoder layers carry (e.g.
    FLAP's compensation bias on o_proj / down_proj), or None when there is none.

    First the model's own config, with the architecture's bias flags turned on where they add a
    needed bias (Llama's `attention_bias` / `mlp_bias`). Qwen2 and Mistral hard-code `bias=False`;
    without sliding windows they are exactly Llama, so next the adapter's equivalent Llama config,
    kept only if a model built from it has the same tensors. The layers get zero biases wherever the
    chosen config builds more than they have (the function is unchanged, the state dict matches).
    None (a sliding-window Mistral or Qwen2): the checkpoint records each layer's biased projections
    in `pruneflow_layers` and `checkpoint.load_pruned` restores them."""
    adapter = adapter or adapter_for(model)
    layers = [la for la in adapter.layers(model) if getattr(la, "pruneflow_kind", "decoder") == "decoder"]
    want = set().union(*(adapter.biased(la) for la in layers))
    for config, own in ((model.config, True), (adapter.bias_capable_config(model.config), False)):
        if config is None or not _bias_flags_cover(adapter, config, want):
            continue
        have = set(adapter.biased(stock_layer(config)))
        for la in layers:
            adapter.add_bias(la, have)
        if own or _same_tensors(model, config):
            return config
    return None


def _bias_flags_cover(adapter: Adapter, config, want: set[str]) -> bool:
    """Turn on (in `config`) the bias flags that add a bias in `want`; True if then all are built."""
    have = set(adapter.biased(stock_layer(config)))
    for flag in adapter.bias_flags:
        if want <= have:
            break
        trial = copy.deepcopy(config)
        setattr(trial, flag, True)
        more = set(adapter.biased(stock_layer(trial)))
        if (more - have) & want:
            setattr(config, flag, True)
            have = more
    return want <= have


def _same_tensors(model: nn.Module, config) -> bool:
    """Whether stock transformers builds, from `config`, a model with exactly `model`'s tensors."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = hfload.from_config(AutoModelForCausalLM, config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def sync_config(model: nn.Module) -> bool:
    """Make the config describe the current shapes. Returns True when stock transformers can
    rebuild the model from it (uniform layers, biases it can build), else records per-layer sizes
    and biases in `config.pruneflow_layers` for `checkpoint.load_pruned`."""
    adapter = adapter_for(model)
    config = model.config
    shapes = adapter.shapes(model)
    stock = adapter.stock_config(config, shapes)
    if stock is not None:
        stock.pop("layer_types", None)
        for k, v in stock.items():
            setattr(config, k, v)
    biases_ok = settle_biases(model, adapter) is not None
    if stock is not None and biases_ok:
        if hasattr(config, "pruneflow_layers"):
            delattr(config, "pruneflow_layers")
        return True
    config.pruneflow_layers = layer_descriptions(model)
    if getattr(config, "head_dim", None) is None and adapter.family == "llama":
        config.head_dim = adapter.head_dim(model)
    return False
