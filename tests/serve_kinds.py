"""Tiny pruned checkpoints of every kind the vLLM export handles, built by pruneflow's own surgery.

A random Llama (hidden 128, 8 query / 4 KV heads of 32, FFN 256, 4 layers; head size 32 is one the vLLM
CPU attention supports) is pruned by `surgery.apply_plan` with a hand-written plan and saved with
`checkpoint.save_pruned` (plan.json included), exactly as a pipeline run writes it.
Used by tests/pruning_core/test_export.py (format) and tests/serve/test_vllm.py (a real vLLM).

Kinds served by stock vLLM: uniform (stock folder), ffn_widths, removed_layer, ffn_replacement,
uniform_heads, whole_blocks (`search.drop_blocks`: attention-free, FFN-free and removed layers) (DeciLM).
Kinds only pruneflow's vLLM plugin serves (`pruneflow_vllm`): per_group_heads
(query heads per layer, as SlimGPT's default `gqa: per_group` leaves them: `make run`'s result),
flap_bias (FLAP's compensation biases on o_proj / down_proj, per-layer heads), attention_free_first
(a Streamline replacement — an attention-free layer — before any attention), qwen2_per_group_heads
(per_group_heads on a Qwen2, whose q/k/v biases DeciLM's Llama model has no form for).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pruning_core.checkpoint import save_pruned
from pruning_core.plan import LayerPlan, PrunePlan
from pruning_core.surgery import apply_plan

N_LAYERS, N_Q, N_KV, HEAD_DIM, FFN = 4, 8, 4, 32, 256
PROMPTS = [[1, 5, 9, 17, 33, 65], [7, 200, 3, 120, 44, 9, 250, 31], [42, 42, 42, 13]]


def tiny_llama(seed: int = 0, family: str = "llama"):
    """Llama, or Qwen2 (q/k/v biases, made non-zero) of the same shape."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config, cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    cfg = config(vocab_size=256, hidden_size=128, intermediate_size=FFN, num_hidden_layers=N_LAYERS,
                 num_attention_heads=N_Q, num_key_value_heads=N_KV, head_dim=HEAD_DIM,
                 max_position_embeddings=256, tie_word_embeddings=True, initializer_range=0.2,
                 bos_token_id=1, eos_token_id=2)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1 and family != "llama":
                p.add_(0.3 * torch.randn_like(p))
    return model


def _ffn(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(FFN, generator=g)[:n].tolist())


def _kv_group_drop(drop: list[int]) -> tuple[list[int], list[int]]:
    """Keep every KV group but `drop`, with all their query heads (rep = 2)."""
    kv = [g for g in range(N_KV) if g not in drop]
    return [2 * g + j for g in kv for j in range(2)], kv


def plans() -> dict[str, PrunePlan]:
    """The five kinds of the issue (and one the format cannot express)."""
    def plan(layers):
        return PrunePlan(method="hand", settings={}, layers=layers)

    out = {}
    q, kv = _kv_group_drop([1, 2])  # transformers wants hidden size (128) divisible by the query heads
    out["uniform"] = plan([LayerPlan(i, heads=q, kv_heads=kv, ffn=_ffn(192, i)) for i in range(N_LAYERS)])
    out["ffn_widths"] = plan([LayerPlan(i, ffn=_ffn(w, i)) for i, w in enumerate((224, 160, 96, 200))])
    out["removed_layer"] = plan([LayerPlan(0, ffn=_ffn(200, 0)), LayerPlan(1, keep=False),
                                 LayerPlan(2, ffn=_ffn(128, 2)), LayerPlan(3)])
    out["ffn_replacement"] = plan([LayerPlan(0), LayerPlan(1, replacement={"kind": "ffn", "span": [1, 3]}),
                                   LayerPlan(2, keep=False), LayerPlan(3, ffn=_ffn(160, 3))])
    # 4 query heads in every layer: as 2 KV groups of 2 (kv_group) or 4 groups of 1 (per_group)
    q2, kv2 = _kv_group_drop([0, 2])
    per_group = [0, 2, 4, 6]
    out["uniform_heads"] = plan([LayerPlan(0, heads=q2, kv_heads=kv2, ffn=_ffn(224, 0)),
                                 LayerPlan(1, heads=per_group, kv_heads=list(range(N_KV)), ffn=_ffn(128, 1)),
                                 LayerPlan(2, heads=q2, kv_heads=kv2),
                                 LayerPlan(3, heads=per_group, kv_heads=list(range(N_KV)), ffn=_ffn(64, 3))])
    # SlimGPT per_group: every KV head kept, 1 or 2 query heads per group, differing between layers
    out["per_group_heads"] = plan([LayerPlan(0, heads=[0, 2, 4, 6], kv_heads=list(range(N_KV)), ffn=_ffn(224, 0)),
                                   LayerPlan(1, ffn=_ffn(160, 1)),
                                   LayerPlan(2, heads=[1, 3, 5, 7], kv_heads=list(range(N_KV)), ffn=_ffn(96, 2)),
                                   LayerPlan(3, heads=[0, 1, 2, 3, 6, 7], kv_heads=[0, 1, 3], ffn=_ffn(200, 3))])
    q3, kv3 = _kv_group_drop([3])
    out["flap_bias"] = plan([LayerPlan(0, heads=q3, kv_heads=kv3, ffn=_ffn(192, 0)), LayerPlan(1, ffn=_ffn(128, 1)),
                             LayerPlan(2, heads=q, kv_heads=kv, ffn=_ffn(224, 2)), LayerPlan(3)])
    out["attention_free_first"] = plan([LayerPlan(0, replacement={"kind": "ffn", "span": [0, 2]}),
                                        LayerPlan(1, keep=False), LayerPlan(2, ffn=_ffn(128, 2)), LayerPlan(3)])
    # `search.drop_blocks`: an attention-free layer (its FFN as a residual layer), an FFN-free one (zero-width MLP)
    # and a layer that lost both (removed)
    out["whole_blocks"] = plan([LayerPlan(0, ffn=_ffn(192, 0)), LayerPlan(1, heads=[], kv_heads=[], ffn=_ffn(160, 1)),
                                LayerPlan(2, ffn=[]), LayerPlan(3, keep=False)])
    out["qwen2_per_group_heads"] = out["per_group_heads"]  # on a Qwen2 (q/k/v biases; no DeciLM form)
    return out


KINDS = ("uniform", "ffn_widths", "removed_layer", "ffn_replacement", "uniform_heads", "whole_blocks",
         "per_group_heads", "flap_bias", "attention_free_first", "qwen2_per_group_heads")
# the layout `export` chooses for each (the lightest format that serves it)
LAYOUTS = {"uniform": "stock", "ffn_widths": "decilm", "removed_layer": "decilm", "ffn_replacement": "decilm",
           "uniform_heads": "decilm", "whole_blocks": "decilm", "per_group_heads": "plugin", "flap_bias": "plugin",
           "attention_free_first": "plugin", "qwen2_per_group_heads": "plugin"}


def unservable_plan() -> PrunePlan:
    q, kv = _kv_group_drop([3])
    return PrunePlan(method="hand", settings={}, layers=[LayerPlan(0), LayerPlan(1, heads=q, kv_heads=kv),
                                                         LayerPlan(2), LayerPlan(3)])


def build(kind: str, folder: Path, seed: int = 0) -> Path:
    plan = unservable_plan() if kind == "unservable" else plans()[kind]
    model = apply_plan(tiny_llama(seed, "qwen2" if kind.startswith("qwen2") else "llama"), plan)
    if kind == "flap_bias":  # FLAP's compensation biases (random here, so that they matter)
        g = torch.Generator().manual_seed(seed + 1)
        for layer in model.model.layers:
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                lin.bias = torch.nn.Parameter(0.5 * torch.randn(lin.out_features, generator=g))
    return save_pruned(model, None, plan, folder)


@torch.no_grad()
def greedy(model, prompts=PROMPTS, n: int = 8) -> list[list[int]]:
    """Greedy continuations (no EOS stop: the random model's EOS is an ordinary token here)."""
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        for _ in range(n):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        out.append(ids[0, len(p):].tolist())
    return out
