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

from ...replacements import ResidualFFN, collapse_block, ffn_from_layer
from ..base import Method, register
from .selection import (
    best_block,
    block_cosines,
    block_influence,
    block_span,
    n_from_ratio,
    score,
    select,
    select_shortgpt,
)
from .settings import ShortGPTSettings, StreamlineSettings
from .training import block_io, lr_at, prefix_block_io, replacement_of, train_replacement

__all__ = [
    "ResidualFFN", "ShortGPTSettings", "StreamlineSettings", "best_block", "block_cosines", "block_influence", "block_span",
    "block_io", "collapse_block", "ffn_from_layer", "lr_at", "n_from_ratio", "prefix_block_io", "replacement_of",
    "score", "select", "select_shortgpt", "train_replacement",
]


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
        select=select,  # the prune step is shared; `recovery: replacement` trains it (recover step)
        cosine_span=block_span,
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
        cosine_span=lambda *_: 1,  # BI compares each layer's input with its output
    )
)
