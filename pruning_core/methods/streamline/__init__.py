"""LLM-Streamline: remove the most redundant block of consecutive layers, train a light replacement.

Paper: Chen et al., "Streamlining Redundant Layers to Compress Large Language Models", ICLR 2025
(arXiv 2403.19135 v5). Files: `selection` (cosines, block choice, ShortGPT), `training` (the
replacement's training loop), `settings`; the replacement modules are layer kinds in
`pruning_core.replacements`.

Block importance (§3.1): x^(l) is the hidden state entering layer l (x^(0) the embeddings,
x^(L) the last layer's output *before* the final norm, captured by the layer stream, not HF's normed
last hidden state). A block of m layers starting at l is scored by the mean over calibration tokens
of cos(x_t^(l), x_t^(l+m)); the block with the highest cosine (it changes the residual stream least)
is chosen: l* = argmax_l cos(x^(l), x^(l+m)).

Replacement (Eq. 3): a light network f_θ is trained with the rest of the model frozen to minimise
mean ||f_θ(x^(l*)) − x^(l*+m)||² (element-wise MSE). Variants (setting `replacement`):

* `none`  — the n layers are deleted, nothing is trained ("Ours(None)").
* `layer` — m = n+1 layers are replaced by one decoder layer initialised from layer l* ("Layer-First");
  in plan terms layer l* is kept and the next n are dropped, so the checkpoint is a stock HF model.
* `collapse` — baseline, LaCo-style (Yang et al. 2024, RDSC layer merge): the m = n+1 layers are merged
  into one, θ* = θ_l* + Σ_k (θ_k − θ_l*) over the block's projection weights (norms from layer l*),
  untrained. Only the merge rule is LaCo's; its iterative top-down threshold search is not reproduced.
* `ffn`   — m = n+1 layers are replaced by a residual FFN x + MLP(norm(x)) initialised from layer l*'s
  MLP and post-attention norm (a residual, inherited form instead of the released code's randomly
  initialised MLP without residual, which starts far from the near-identity map the block is).
  Saved through `checkpoint.load_pruned`.

Training differs from the released script on purpose: the replacement is called with
the exact keyword arguments the real model passes to layer l* (causal mask, rotary
`position_embeddings`), caught by a forward pre-hook — never `attention_mask=None` bidirectional
attention; `use_cache=False` and surgery renumbers `layer_idx`; the cosine schedule decays per
optimiser step down to its floor; the best weights on validation are *copied*.

Baseline `shortgpt` (Men et al. 2024): Block Influence BI_l = 1 − E_t[cos(x^(l), x^(l+1))]; the n
individually least influential layers are removed (not necessarily contiguous). No training.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ...adapters import Adapter
from ...capture import capture_stats
from ...plan import PrunePlan
from ...replacements import ResidualFFN, collapse_block, ffn_from_layer, ffn_norm_name
from ..base import Method, register
from .selection import (
    _depth_budget,
    best_block,
    block_cosines,
    block_influence,
    n_from_ratio,
    score,
    select,
    select_shortgpt,
)
from .settings import ShortGPTSettings, StreamlineSettings, recovery_settings
from .training import block_io, lr_at, replacement_of, replacement_recover, train_replacement

__all__ = [
    "ResidualFFN", "ShortGPTSettings", "StreamlineSettings", "best_block", "block_cosines", "block_influence",
    "block_io", "collapse_block", "ffn_from_layer", "lr_at", "n_from_ratio", "prune", "replacement_of",
    "replacement_recover", "score", "select", "select_shortgpt", "train_replacement",
]


class _Fp32(nn.Module):
    """Runs an fp32 module on low-precision inputs (hidden states and floating keyword tensors cast)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, *args, **kwargs):
        def up(v):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return v.float()
            if isinstance(v, tuple):
                return tuple(up(x) for x in v)
            return v

        return self.inner(up(hidden_states), *args, **{k: up(v) for k, v in kwargs.items()})


def prune(
    model: nn.Module,
    adapter: Adapter,
    calib_ids: torch.Tensor,
    ratio: float | None,
    settings: StreamlineSettings | dict | None,
    device: torch.device | str = "cpu",
) -> PrunePlan:
    """The pipeline's prune step for LLM-Streamline (capture, score, select, and train the
    replacement on the calibration blocks). The trained weights are written back into layer l* of
    `model` (for `ffn`: its MLP and post-attention norm), so that surgery with the returned plan
    builds the trained replacement. `steps: 0` (or replacement none/collapse) trains nothing."""
    s = settings if isinstance(settings, StreamlineSettings) else recovery_settings(settings)
    # only the block size this ratio compares is kept during capture (cos[l, l+m]; the rest stays 0)
    n = _depth_budget(model, adapter, ratio, s.n_layers)[3]
    span = n if s.replacement == "none" else n + 1
    stats = capture_stats(
        model, adapter, calib_ids, requests={"cosine"}, device=device, batch_size=s.batch_size, cosine_span=span
    )
    plan = select(model, adapter, score(model, adapter, stats, s), ratio, s)
    if s.replacement in ("layer", "ffn") and s.steps > 0:
        # no model copy: the replacement is built from a copy of layer l* alone, the frozen teacher
        # is `model` itself (its forward brings each layer in under placement offload / disk)
        from ...placement import resident

        new_idx, start, _, kind = replacement_of(plan)
        target = adapter.layers(model)[start]
        with resident(target):
            module = copy.deepcopy(target) if kind == "layer" else ffn_from_layer(adapter, target)
        for mod in module.modules():  # a copy of a placed layer is an ordinary module
            mod.__dict__.pop("_pf_home", None)
            mod._forward_hooks.clear()
            mod._forward_pre_hooks.clear()
        low = next(module.parameters()).dtype != torch.float32
        trainee = _Fp32(module.float()) if low else module  # fp32 master weights for bf16 / fp16 models
        info = train_replacement(model, None, plan, calib_ids, s, device=device, module=trainee)
        with resident(target, write_back=True), torch.no_grad():
            if kind == "layer":
                target.load_state_dict(module.state_dict())
            else:
                adapter.mlp(target).load_state_dict(module.mlp.state_dict())
                getattr(target, ffn_norm_name(adapter)).load_state_dict(module.norm.state_dict())
        plan.notes["training"] = {k: v for k, v in info.items() if k != "lr_curve"}
        del module
    return plan


register(
    Method(
        name="llm-streamline",
        summary="remove the most redundant block of consecutive layers (hidden-state cosine); "
        "replace it by one trained layer or residual FFN",
        settings=StreamlineSettings,
        paper="Chen et al., Streamlining Redundant Layers to Compress LLMs, ICLR 2025 (arXiv 2403.19135)",
        targets=("layers",),
        needs=frozenset({"cosine"}),
        score=score,
        select=select,
        prune=prune,  # the pipeline trains the replacement inside the prune step (recovery: replacement)
    )
)

register(
    Method(
        name="shortgpt",
        summary="remove the layers with the lowest Block Influence 1 - cos(x_l, x_l+1)",
        settings=ShortGPTSettings,
        paper="Men et al., ShortGPT: Layers in LLMs are More Redundant Than You Expect (arXiv 2403.03853)",
        targets=("layers",),
        needs=frozenset({"cosine"}),
        score=score,
        select=select_shortgpt,
    )
)
