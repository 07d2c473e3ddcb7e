"""Which layers LLM-Streamline and ShortGPT remove, from the cosine matrix of the layer inputs.

x^(l) is the hidden state entering layer l (x^(0) the embeddings, x^(L) the last layer's output
*before* the final norm, captured by the layer stream). LLM-Streamline (Chen et al., ICLR 2025,
arXiv 2403.19135, §3.1) scores a block of m layers starting at l by the mean over calibration tokens
of cos(x_t^(l), x_t^(l+m)) and removes the block with the highest cosine. ShortGPT (Men et al. 2024,
arXiv 2403.03853, §3) removes the n layers with the lowest Block Influence BI_l = 1 − cos(x^(l),
x^(l+1)), contiguous or not. The number of layers comes from the ratio, a fraction of all parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from ...adapters import Adapter
from ...errors import ConfigError
from ...plan import LayerPlan, PrunePlan
from ...replacements import ffn_norm_name
from ...surgery import count_params
from ..base import Scores
from .settings import ShortGPTSettings, StreamlineSettings

# scoring: pure functions on the cosine matrix


def block_influence(cos: torch.Tensor) -> torch.Tensor:
    """ShortGPT BI_l = 1 − cos(x^(l), x^(l+1)) for l = 0..L−1, from the [L+1, L+1] cosine matrix."""
    n = cos.shape[0] - 1
    return 1.0 - torch.stack([cos[i, i + 1] for i in range(n)])


def block_cosines(cos: torch.Tensor, m: int) -> torch.Tensor:
    """cos(x^(l), x^(l+m)) for every start l = 0..L−m (the redundancy of each m-layer block)."""
    n = cos.shape[0] - 1
    if not 1 <= m <= n:
        raise ConfigError("n_layers", m, f"a block size between 1 and {n}")
    return torch.stack([cos[i, i + m] for i in range(n - m + 1)])


def best_block(cos: torch.Tensor, m: int) -> int:
    """l* = argmax_l cos(x^(l), x^(l+m)): the start of the most redundant m-layer block."""
    return int(torch.argmax(block_cosines(cos, m)))


def score(model: nn.Module, adapter: Adapter, stats: dict, settings) -> Scores:
    """Scores from `capture_stats(..., requests={"cosine"})`: the cosine matrix (within the span the
    capture kept: `block_span` for the run's ratios, 1 for ShortGPT) and ShortGPT's per-layer BI."""
    if "cosine" not in stats:
        raise ConfigError(
            "capture.requests", sorted(k for k in stats if "." not in k), "statistics including 'cosine'"
        )
    cos = stats["cosine"].to(torch.float64)
    n_layers = len(adapter.layers(model))
    if cos.shape != (n_layers + 1, n_layers + 1):
        raise ConfigError(
            "stats.cosine", tuple(cos.shape), f"a [{n_layers + 1}, {n_layers + 1}] matrix for this model"
        )
    return {"block_cos": cos, "layer_bi": block_influence(cos)}


def n_from_ratio(
    ratio: float | None, total: int, per_layer: float, n_layers: int, override: int | None
) -> int:
    """Layers to remove (net): `override` if given, else round(ratio · total / params per layer),
    `total` being the decoder-layer parameters: the ratio is the fraction of decoder-layer parameters
    removed, as for every pruneflow method (the paper counts all parameters; its 25 % on Llama2-7B is
    about 26 % of the decoder layers). Whole layers only: the realised fraction is reported."""
    limit = n_layers - 1
    if override is not None:
        n = int(override)
    else:
        if ratio is None or not 0 < float(ratio) < 1:
            raise ConfigError(
                "ratio", ratio, "a fraction of parameters strictly between 0 and 1 (or settings.n_layers)"
            )
        n = max(1, round(float(ratio) * total / per_layer))
    if n > limit:
        raise ConfigError(
            "ratio" if override is None else "method.settings.n_layers",
            ratio if override is None else n,
            f"a value that removes at most {limit} of {n_layers} layers",
        )
    return n


def _ffn_params(adapter: Adapter, layer: nn.Module) -> int:
    return count_params(adapter.mlp(layer)) + count_params(getattr(layer, ffn_norm_name(adapter)))


def _depth_budget(model: nn.Module, adapter: Adapter, ratio: float | None, n_layers: int | None):
    """(layers, total params, params per layer, number of layers to remove) for a depth method."""
    layers = adapter.layers(model)
    total = count_params(model)
    per = [count_params(layer) for layer in layers]
    return layers, total, per, n_from_ratio(ratio, sum(per), sum(per) / len(layers), len(layers), n_layers)


def rounding_note(ratio: float | None, n: int, n_layers: int, removed: int, decoder: int) -> str:
    """The line a depth method reports: its ratio rounded to whole layers, and what that realises."""
    asked = "" if ratio is None else f"ratio {ratio:g} rounded to whole layers: "
    return f"{asked}{n} of {n_layers} layers removed = {removed / decoder:.1%} of decoder-layer parameters"


def _removal_plan(method: str, settings, ratio, per: list[int], total: int, drop: list[int],
                  notes: dict, replacement: dict | None = None, replacement_params: int = 0) -> PrunePlan:
    """A plan dropping layers `drop`; a replacement sits in the first of them (kept, marked)."""
    layers = [LayerPlan(i, keep=i not in drop) for i in range(len(per))]
    after = total - sum(per[i] for i in drop)
    if replacement is not None:
        first = layers[drop[0]]
        first.keep, first.replacement = True, replacement
        after += replacement_params
    n = notes.get("layers_removed", len(drop))
    notes = {**notes, "rounding": rounding_note(None if getattr(settings, "n_layers", None) else ratio, n,
                                                len(per), total - after, sum(per))}
    return PrunePlan(method=method, settings=settings.model_dump(), layers=layers, target_ratio=ratio,
                     params_before=total, params_after=after, notes=notes)


def block_span(model: nn.Module, adapter: Adapter, ratios, settings) -> int:
    """The largest block LLM-Streamline compares at these ratios (m = n, or n + 1 with a replacement):
    capture keeps the states of m + 1 consecutive layers, not of all of them."""
    s = settings if isinstance(settings, StreamlineSettings) else StreamlineSettings(**(settings or {}))
    extra = 0 if s.replacement == "none" else 1
    return max(_depth_budget(model, adapter, r, s.n_layers)[3] + extra for r in (list(ratios) or [None]))


def select(model: nn.Module, adapter: Adapter, scores: Scores, ratio: float | None, settings) -> PrunePlan:
    """The most redundant contiguous block for the ratio; a PrunePlan dropping it (and marking the
    replacement on its first layer for the `layer` / `ffn` variants)."""
    s = settings if isinstance(settings, StreamlineSettings) else StreamlineSettings(**(settings or {}))
    layers, total, per, n = _depth_budget(model, adapter, ratio, s.n_layers)
    cos = scores["block_cos"]
    m = n if s.replacement == "none" else n + 1  # a replacement takes the place of n + 1 layers
    start = best_block(cos, m)
    notes = {"block": [start, start + m], "block_cos": float(cos[start, start + m]), "layers_removed": n,
             "replacement": s.replacement}
    if s.replacement == "none":
        return _removal_plan("llm-streamline", s, ratio, per, total, list(range(start, start + m)), notes)
    kept = _ffn_params(adapter, layers[start]) if s.replacement == "ffn" else per[start]
    return _removal_plan("llm-streamline", s, ratio, per, total, list(range(start, start + m)), notes,
                         {"kind": s.replacement, "span": [start, start + m]}, kept)


def select_shortgpt(
    model: nn.Module, adapter: Adapter, scores: Scores, ratio: float | None, settings
) -> PrunePlan:
    """Remove the n layers with the lowest Block Influence (ShortGPT, Men et al. 2024, §3)."""
    s = settings if isinstance(settings, ShortGPTSettings) else ShortGPTSettings(**(settings or {}))
    _layers, total, per, n = _depth_budget(model, adapter, ratio, s.n_layers)
    bi = scores["layer_bi"].to(torch.float64)
    drop = sorted(int(i) for i in torch.argsort(bi, stable=True)[:n])
    notes = {"removed_layers": drop, "layers_removed": n, "bi": [round(float(b), 6) for b in bi]}
    return _removal_plan("shortgpt", s, ratio, per, total, drop, notes)
