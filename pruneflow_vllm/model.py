"""`PruneflowLlamaForCausalLM`: vLLM's Llama with every decoder layer built to its own shape.

The folder's config.json is the checkpoint's own (a Llama-family config, read by stock transformers, so
no remote code) with `architectures = ["PruneflowLlamaForCausalLM"]` and pruneflow's per-layer list
`pruneflow_layers`, one entry per layer of the checkpoint (`pruning_core.surgery.layer_descriptions`):

* `{"kind": "decoder", "n_heads", "n_kv_heads", "ffn", "bias": [projections with a bias]}`: a Llama
  layer with that many query heads, KV heads (its own KV-cache shape) and FFN channels; biases exactly
  on the listed projections (FLAP's compensation biases on o_proj / down_proj included). `n_heads` 0
  is an attention-free layer, `ffn` 0 an FFN-free one (their zero-sized tensors are not loaded).
* `{"kind": "ffn", "ffn"}`: LLM-Streamline's replacement x + MLP(norm(x)), an attention-free layer whose
  norm is saved as `model.layers.<i>.norm`.

Everything else — embeddings, rotary tables, the attention kernels and KV cache, weight loading of the
stacked q/k/v and gate/up projections, torch.compile — is vLLM's own `LlamaForCausalLM`, given this
layer type. The residual stream follows vLLM's fused add + RMSNorm convention: a layer returns
(hidden_states, residual) and the next norm adds them, so a skipped sub-block simply adds nothing.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from vllm.model_executor.models.utils import extract_layer_index

_QKV = ("q_proj", "k_proj", "v_proj")
_MLP_IN = ("gate_proj", "up_proj")


def _layer_desc(config, i: int) -> dict:
    layers = getattr(config, "pruneflow_layers", None)
    if not layers or len(layers) != config.num_hidden_layers:
        raise ValueError("PruneflowLlamaForCausalLM needs `pruneflow_layers` in config.json, one entry per "
                         "layer (a folder written by `pruneflow export`)")
    d = dict(layers[i])
    if d.get("kind", "decoder") not in ("decoder", "ffn"):
        raise ValueError(f"pruneflow layer {i}: kind {d.get('kind')!r} is not servable (decoder or ffn)")
    if "bias" not in d:  # written before per-layer biases were recorded: the config's flags
        d["bias"] = ([*_QKV, "o_proj"] if getattr(config, "attention_bias", False) else []) + \
                    ([*_MLP_IN, "down_proj"] if getattr(config, "mlp_bias", False) else [])
    if d.get("kind") == "ffn":
        d.update(n_heads=0, n_kv_heads=0, bias=[*_MLP_IN, "down_proj"] if getattr(config, "mlp_bias", False) else [])
    return d


class PrunedLlamaLayer(nn.Module):
    """One decoder layer of its own shape; vLLM's `LlamaDecoderLayer` call signature."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None) -> None:
        super().__init__()
        config = config or vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.layer_idx = extract_layer_index(prefix)
        d = _layer_desc(config, self.layer_idx)
        self.kind, bias = d.get("kind", "decoder"), set(d["bias"])
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = self.mlp = None
        if d["n_heads"]:
            self.input_layernorm = RMSNorm(hidden, eps=eps)
            self.self_attn = LlamaAttention(
                config=config, hidden_size=hidden, num_heads=int(d["n_heads"]), num_kv_heads=int(d["n_kv_heads"]),
                max_position_embeddings=getattr(config, "max_position_embeddings", 8192), quant_config=quant_config,
                bias=bool(bias & set(_QKV)), bias_o_proj="o_proj" in bias, cache_config=vllm_config.cache_config,
                prefix=f"{prefix}.self_attn")
        if d["ffn"]:
            # the replacement's norm is `norm` in its checkpoint; a decoder layer's `post_attention_layernorm`
            self.ffn_norm_name = "norm" if self.kind == "ffn" else "post_attention_layernorm"
            setattr(self, self.ffn_norm_name, RMSNorm(hidden, eps=eps))
            self.mlp = LlamaMLP(hidden_size=hidden, intermediate_size=int(d["ffn"]), hidden_act=config.hidden_act,
                                quant_config=quant_config, bias=bool(bias & {*_MLP_IN, "down_proj"}),
                                prefix=f"{prefix}.mlp")
        # biases the module has but the checkpoint lacks (one flag covers q/k/v, one gate/up/down): zeros
        self.zero_biases = {}
        hd = getattr(self.self_attn, "head_dim", 0)
        sizes = {"q_proj": int(d["n_heads"]) * hd, "k_proj": int(d["n_kv_heads"]) * hd,
                 "v_proj": int(d["n_kv_heads"]) * hd, "gate_proj": int(d["ffn"]), "up_proj": int(d["ffn"]),
                 "o_proj": hidden, "down_proj": hidden}
        for group, sub in ((_QKV, "self_attn"), ((*_MLP_IN, "down_proj"), "mlp")):
            if bias & set(group):
                self.zero_biases.update({f"{sub}.{p}.bias": sizes[p] for p in group if p not in bias})

    @staticmethod
    def _norm(norm: RMSNorm, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            return norm(hidden_states), hidden_states
        return norm(hidden_states, residual)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                **_kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.self_attn is not None:
            hidden_states, residual = self._norm(self.input_layernorm, hidden_states, residual)
            hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        if self.mlp is not None:
            hidden_states, residual = self._norm(getattr(self, self.ffn_norm_name), hidden_states, residual)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual


class PruneflowLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's Llama with `PrunedLlamaLayer`s; weights of absent sub-blocks skipped, missing biases zeroed."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", layer_type: type[nn.Module] = PrunedLlamaLayer):
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)

    def _checkpoint_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        layers = {i: m for i, m in enumerate(self.model.layers) if isinstance(m, PrunedLlamaLayer)}
        absent = {}
        for i, m in layers.items():
            if m.self_attn is None:
                absent[i] = ("self_attn.", "input_layernorm.")
            if m.mlp is None:
                absent[i] = absent.get(i, ()) + ("mlp.", "post_attention_layernorm.")
        seen = set()
        for name, tensor in weights:
            parts = name.split(".")
            if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers" and int(parts[2]) in layers:
                i, rest = int(parts[2]), ".".join(parts[3:])
                if rest.startswith(absent.get(i, ("\0",))):
                    continue  # a zero-sized sub-block: the layer has no such module
                seen.add(name)
            yield name, tensor
        dtype = self.model.embed_tokens.weight.dtype
        for i, m in layers.items():
            for rest, n in m.zero_biases.items():
                if f"model.layers.{i}.{rest}" not in seen:
                    yield f"model.layers.{i}.{rest}", torch.zeros(n, dtype=dtype)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(self._checkpoint_weights(weights))
