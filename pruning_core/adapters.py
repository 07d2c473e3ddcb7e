"""Architecture adapters: one per model family, naming projections, head layout and norms.

Every architecture-specific fact lives here; the rest of the core asks the adapter. Supported:
Llama-like decoders (Llama, Mistral, Qwen2, SmolLM: SwiGLU MLP, RMSNorm, GQA, optional q/k/v bias)
and OPT (fc1/fc2 with biases, LayerNorm, learned positions, MHA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError


def slice_linear(lin: nn.Linear, idx: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping `idx` along `dim` (0: output rows, 1: input columns); bias follows rows.
    Device, dtype, training mode and `requires_grad` are the old module's."""
    w = lin.weight.data.index_select(dim, idx.to(lin.weight.device))  # a new tensor (index_select copies)
    bias = lin.bias is not None
    out_f, in_f = w.shape
    # built on meta and given the sliced tensors: no random initialisation of weights that are overwritten
    # (kaiming_uniform_ of an 8B-sized FFN projection takes longer than slicing it)
    new = nn.Linear(in_f, out_f, bias=bias, device="meta", dtype=w.dtype)
    new.weight = nn.Parameter(w, requires_grad=lin.weight.requires_grad)
    if bias:
        b = lin.bias.data
        nb = b.index_select(0, idx.to(b.device)) if dim == 0 else b.clone()
        new.bias = nn.Parameter(nb, requires_grad=lin.bias.requires_grad)
    return new.train(lin.training)


def decoder_layer_class(config) -> type:
    """The stock transformers decoder-layer class of `config`'s architecture."""
    import importlib

    mt = config.model_type
    try:
        mod = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    except ImportError:
        mod = None
    for name in dir(mod) if mod is not None else ():
        if name.endswith("DecoderLayer") and name.lower().startswith(mt.replace("_", "")):
            return getattr(mod, name)
    raise ConfigError("model.architecture", mt, "a transformers model with a *DecoderLayer class")


def stock_layer(config, device: str | torch.device = "meta") -> nn.Module:
    """One decoder layer as stock transformers builds it from `config` (on `meta`: nothing allocated),
    under the process-wide build lock (see `hfload`)."""
    from .hfload import BUILD_LOCK

    with BUILD_LOCK, torch.device(device):
        return decoder_layer_class(config)(config, layer_idx=0)


def _idx(keep: list[int]) -> torch.Tensor:
    return torch.as_tensor(sorted(keep), dtype=torch.long)


@dataclass(frozen=True)
class LayerShape:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    kind: str = "decoder"  # "decoder" or a replacement kind registered in `modules`


class Adapter:
    """Base: subclasses fill in names; methods here are written once against those names."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    q, k, v, o = "q_proj", "k_proj", "v_proj", "o_proj"
    mlp_in: tuple[str, ...] = ()  # modules whose output rows are FFN channels
    mlp_out: str = ""  # module whose input columns are FFN channels
    attn_path: str = "self_attn"
    mlp_path: str = "mlp"
    # config flags that make stock transformers build biases on the projections (where it has any)
    bias_flags: tuple[str, ...] = ()

    @property
    def projections(self) -> tuple[str, ...]:
        """Every projection of a decoder layer, attention first."""
        return (self.q, self.k, self.v, self.o, *self.mlp_in, self.mlp_out)

    def biased(self, layer: nn.Module) -> list[str]:
        """The projections of `layer` that carry a bias."""
        return [n for n in self.projections if self.proj(layer, n).bias is not None]

    def add_bias(self, layer: nn.Module, names) -> None:
        """Give projections `names` of `layer` a zero bias where they have none (function unchanged)."""
        for n in names:
            lin = self.proj(layer, n)
            if lin.bias is None:
                w = lin.weight
                lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=w.dtype, device=w.device),
                                        requires_grad=w.requires_grad)

    # -- navigation ------------------------------------------------------------------------------
    def decoder(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def attn(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.attn_path)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.mlp_path) if self.mlp_path else layer

    def proj(self, layer: nn.Module, name: str) -> nn.Linear:
        if name in (self.q, self.k, self.v, self.o):
            return getattr(self.attn(layer), name)
        return getattr(self.mlp(layer), name)

    def module_name(self, name: str) -> str:
        """Path of a projection relative to the decoder layer (for hooks)."""
        if name in (self.q, self.k, self.v, self.o):
            return f"{self.attn_path}.{name}"
        return f"{self.mlp_path}.{name}" if self.mlp_path else name

    # -- shapes ----------------------------------------------------------------------------------
    def head_dim(self, model: nn.Module) -> int:
        raise NotImplementedError

    def layer_shape(self, model: nn.Module, layer: nn.Module) -> LayerShape:
        kind = getattr(layer, "pruneflow_kind", "decoder")
        if kind != "decoder":
            return LayerShape(0, 0, self.head_dim(model), 0, kind)
        hd = self.head_dim(model)
        n_q = self.proj(layer, self.q).out_features // hd
        n_kv = self.proj(layer, self.k).out_features // hd
        ffn = self.proj(layer, self.mlp_out).in_features
        return LayerShape(n_q, n_kv, hd, ffn)

    def shapes(self, model: nn.Module) -> list[LayerShape]:
        return [self.layer_shape(model, layer) for layer in self.layers(model)]

    # -- surgery ---------------------------------------------------------------------------------
    def prune_heads(self, model: nn.Module, layer: nn.Module, keep_q: list[int], keep_kv: list[int]) -> None:
        """Physically keep query heads `keep_q` and KV heads `keep_kv` (GQA grouping checked)."""
        hd = self.head_dim(model)
        shape = self.layer_shape(model, layer)
        if not keep_q or not keep_kv:
            raise ConfigError("ratio", 1.0, "a ratio that keeps at least one head per layer")
        rep = shape.n_heads // shape.n_kv_heads
        groups = {q // rep for q in keep_q}
        if not groups <= set(keep_kv):
            raise ConfigError("plan.heads", sorted(keep_q), f"query heads whose KV groups {sorted(keep_kv)} are kept")
        per_group = [sum(1 for q in keep_q if q // rep == g) for g in sorted(keep_kv)]
        if len(set(per_group)) != 1:
            raise ConfigError(
                "plan.heads", sorted(keep_q), "the same number of query heads in every kept KV group (GQA)"
            )
        qi = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in sorted(keep_q)])
        kvi = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in sorted(keep_kv)])
        attn = self.attn(layer)
        setattr(attn, self.q, slice_linear(getattr(attn, self.q), qi, 0))
        setattr(attn, self.k, slice_linear(getattr(attn, self.k), kvi, 0))
        setattr(attn, self.v, slice_linear(getattr(attn, self.v), kvi, 0))
        setattr(attn, self.o, slice_linear(getattr(attn, self.o), qi, 1))
        self._set_head_attrs(attn, len(keep_q), len(keep_kv))

    def _set_head_attrs(self, attn: nn.Module, n_q: int, n_kv: int) -> None:
        raise NotImplementedError

    def prune_ffn(self, layer: nn.Module, keep: list[int], allow_empty: bool = False) -> None:
        """Physically keep FFN channels `keep`. `allow_empty`: none may stay (an FFN-free layer of a
        plan that removes the whole block: zero-width projections, the MLP then adds its output bias
        or nothing)."""
        if not keep and not allow_empty:
            raise ConfigError("ratio", 1.0, "a ratio that keeps at least one FFN channel per layer")
        idx = _idx(keep)
        mlp = self.mlp(layer)
        for name in self.mlp_in:
            setattr(mlp, name, slice_linear(getattr(mlp, name), idx, 0))
        setattr(mlp, self.mlp_out, slice_linear(getattr(mlp, self.mlp_out), idx, 1))

    def renumber(self, model: nn.Module) -> None:
        """Give kept layers consecutive `layer_idx` (KV cache slots) and fix per-layer config lists."""
        layers = self.layers(model)
        for i, layer in enumerate(layers):
            layer.layer_idx = i if hasattr(layer, "layer_idx") else getattr(layer, "layer_idx", None)
            attn = getattr(layer, self.attn_path.split(".")[0], None)
            if attn is not None and hasattr(attn, "layer_idx"):
                attn.layer_idx = i

    # -- config ----------------------------------------------------------------------------------
    def stock_config(self, config, shapes: list[LayerShape]) -> dict | None:
        """Config updates that let stock transformers build this shape, or None if it can't."""
        raise NotImplementedError

    def ffn_sizes_key(self) -> str:
        raise NotImplementedError

    def bias_capable_config(self, config):
        """A config of another stock architecture that computes the same function and can carry
        biases this one hard-codes away, or None."""
        return None


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "smollm3")
    mlp_in = ("gate_proj", "up_proj")
    mlp_out = "down_proj"
    bias_flags = ("attention_bias", "mlp_bias")  # Llama reads them; Qwen2 / Mistral hard-code theirs

    def decoder(self, model):
        return model.model

    def head_dim(self, model):
        c = model.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def _set_head_attrs(self, attn, n_q, n_kv):
        attn.num_key_value_groups = n_q // n_kv
        for a, v in (("num_heads", n_q), ("num_key_value_heads", n_kv)):
            if hasattr(attn, a):
                setattr(attn, a, v)

    def stock_config(self, config, shapes):
        kinds = {s.kind for s in shapes}
        uniq = {(s.n_heads, s.n_kv_heads, s.ffn) for s in shapes}
        if kinds != {"decoder"} or len(uniq) != 1:
            return None
        n_q, n_kv, ffn = uniq.pop()
        if int(config.hidden_size) % n_q:
            # transformers' LlamaConfig rejects hidden_size % heads != 0 even with an explicit head_dim
            # (e.g. 32 -> 24 heads of 128 at hidden 4096): the per-layer description loads it instead
            return None
        upd = {
            "num_hidden_layers": len(shapes),
            "num_attention_heads": n_q,
            "num_key_value_heads": n_kv,
            "intermediate_size": ffn,
            "head_dim": shapes[0].head_dim,
        }
        if getattr(config, "layer_types", None) is not None:
            upd["layer_types"] = None  # filled by the caller with the kept layers' types
        return upd

    def ffn_sizes_key(self):
        return "intermediate_size"

    def bias_capable_config(self, config):
        """Qwen2 and Mistral hard-code `bias=False` on o_proj / down_proj, but with no layer using a
        sliding window they compute exactly what Llama does: the equivalent LlamaConfig (whose
        `attention_bias` / `mlp_bias` flags build those biases), else None."""
        if config.model_type == "llama":
            return None
        types = list(getattr(config, "layer_types", None) or [])
        window = getattr(config, "sliding_window", None)
        if any(t != "full_attention" for t in types):
            return None
        if not types and window is not None and window < config.max_position_embeddings:
            return None
        from transformers import LlamaConfig

        d = config.to_dict()
        for k in ("model_type", "architectures", "auto_map", "transformers_version", "pruneflow_layers",
                  "use_sliding_window", "sliding_window", "max_window_layers", "layer_types"):
            d.pop(k, None)
        llama = LlamaConfig(**d)
        llama.architectures = ["LlamaForCausalLM"]
        return llama


class OPTAdapter(Adapter):
    family = "opt"
    model_types = ("opt",)
    o = "out_proj"
    mlp_in = ("fc1",)
    mlp_out = "fc2"
    mlp_path = ""
    bias_flags = ("enable_bias",)

    def decoder(self, model):
        return model.model.decoder

    def head_dim(self, model):
        c = model.config
        return c.hidden_size // c.num_attention_heads

    def _set_head_attrs(self, attn, n_q, n_kv):
        attn.num_heads = n_q

    def stock_config(self, config, shapes):
        kinds = {s.kind for s in shapes}
        uniq = {(s.n_heads, s.ffn) for s in shapes}
        if kinds != {"decoder"} or len(uniq) != 1:
            return None
        n_q, ffn = uniq.pop()
        if n_q != config.num_attention_heads:  # OPT derives head_dim from hidden/heads: heads can't change
            return None
        return {"num_hidden_layers": len(shapes), "ffn_dim": ffn}

    def ffn_sizes_key(self):
        return "ffn_dim"


ADAPTERS: dict[str, Adapter] = {}
for _a in (LlamaAdapter(), OPTAdapter()):
    for _t in _a.model_types:
        ADAPTERS[_t] = _a


def supported_architectures() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(model_or_config) -> Adapter:
    config = getattr(model_or_config, "config", model_or_config)
    mt = getattr(config, "model_type", None)
    if mt not in ADAPTERS:
        raise ConfigError("model.architecture", mt, ", ".join(supported_architectures()))
    return ADAPTERS[mt]
