"""LLM-Rank: weighted PageRank over the FFNs seen as a layered graph (FFN channels removed).

Paper: Hoffmann, Budhathoki, Kleindessner, "LLM-Rank: A Graph Theoretical Approach to Pruning
Large Language Models", arXiv 2410.13299 (2024); the MLP version ("MLP-Rank") is the same scorer
applied to plain perceptrons (see `benchmarks/mlp_models.py`). The formula is the paper's modified
weighted PageRank (Sec. 3) as its released code computes it.

Each Linear layer with weight W (n_out x n_in) is a bipartite slice of a DAG: edge j -> i with
weight |W[i,j]|, adjacency A[i,j] = (W[i,j] != 0). With p the (per-layer normalised) importance of
the layer's input nodes and a_out the calibration L2 norm of its output nodes:

    c_j  = sum_i |W[i,j]|          d_j = sum_i A[i,j]        (column strength / mask-aware out-degree)
    M p  = theta * |W| (p / c) + (1 - theta) * A (p / d)      (0/0 -> 0)
    p'   = normalise( gamma * M p + (1 - gamma) * a_out / sum(a_out) )

One forward sweep in topological order is the exact fixed point (the graph is a DAG). Only the
column vectors c, d and two mat-vecs are needed; W is read in row chunks so no dense temporary
larger than one chunk is made (`_CHUNK_ELEMS`).

Defaults and why (measured on smollm2-135m, `benchmarks/RESULTS.md`, section llm-rank-llm):
* gamma = 0.5, theta = 0.5, node = "down_in", pipeline = "isolated". The MLP-Rank code uses
  gamma 0.9 / theta 0.5 with the up_proj output as node, and the released LLM code uses gamma = 0,
  where the score *is* the channel's activation norm (the propagated prior is multiplied by 0), so
  "LLM-Rank" with gamma = 0 is the activation baseline and chained == isolated. On SmolLM2 the
  up_proj-output node is far worse than the down_proj-input node h = silu(gate) * up (OPT:
  relu(fc1)), the value the channel actually writes with (PPL at 20 %: 55 vs 26), and gamma 0.9
  is far worse than 0.5 (PPL 30 vs 25 with node down_in; 405 vs 57 with node up). gamma = 0.5
  keeps the method a graph method while matching the best measured quality; isolated and chained
  were equal within noise, and isolated scores in half the time. All are settings.
* theta: on a dense layer A (p/d) = sum(p)/n_out is the same for every node, so the degree term
  only shifts all scores by a constant; theta then merely re-weights propagation against the
  teleport ((gamma, theta) ranks exactly like (gamma*theta/(gamma*theta + 1 - gamma), 1)), and at
  gamma = 1 it changes no ranking. The degree term itself differs between nodes only once a layer
  has zero weights (e.g. after an earlier pruning), which is where theta matters on its own.
* pipeline: "chained" joins the FFNs into one deep graph up_0 -> down_0 -> up_1 -> ..., the
  residual stream being an identity link (attention and norms ignored, as in the paper);
  "isolated" scores each FFN as its own 2-layer graph with the FFN input norm as prior.
* `ratio` is the fraction of decoder-layer parameters removed (as for every method): it becomes the
  channel fraction ratio x (layer parameters / FFN parameters), about 1.33 x ratio on Llama shapes.
* allocation "local" removes that fraction of channels (rounded) in every layer (the paper's
  "uniform"). "global" ranks all layers together; because every layer's scores sum to 1, a wide
  layer's scores are smaller (mean 1/n) and the upstream global pruner over-prunes wide layers. We
  correct that bias by comparing n_l * score (each layer's scores then have mean 1), and keep at
  least one channel per layer.

The unit removed is the FFN intermediate channel: SwiGLU gate row, up row and down column; OPT fc1
row with its bias and fc2 column. Edges into a channel are up_proj's (OPT: fc1's) row, as upstream;
the gate is not part of the graph. Baseline "mpr" (the repo's ModifiedPageRank):
score_i = (|W| p)_i * a_out_i, normalised per layer.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from ..engine import visit_layers
from ..errors import DataError
from ..metrics import plan_params
from ..plan import LayerPlan, PrunePlan
from ..search import Budget, SearchSettings, needs_tables
from ..select import check_ratio, ffn_unit_ratio, plan_from_scores, unit_sizes
from .base import Method, MethodSettings, register

_CHUNK_ELEMS = 1 << 22  # rows of W are read in chunks of at most ~4M elements (32 MB in fp64)
_DT = torch.float64


# ------------------------------------------------------------------------------------------------
# pure maths on tensors
# ------------------------------------------------------------------------------------------------
def normalise(v: torch.Tensor) -> torch.Tensor:
    """v / sum(v) in fp64; a vector with zero (or non-finite) sum becomes uniform."""
    v = v.to(_DT).clamp_min(0)
    s = float(v.sum())
    if not math.isfinite(s) or s <= 0:
        return torch.full_like(v, 1.0 / max(1, v.numel()))
    return v / s


def _row_chunks(w: torch.Tensor):
    step = max(1, _CHUNK_ELEMS // max(1, w.shape[1]))
    for r in range(0, w.shape[0], step):
        yield r, w[r : r + step].to(_DT)


def column_stats(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, d): column sums of |W| and the number of non-zero entries per column (out-degree)."""
    c = torch.zeros(w.shape[1], dtype=_DT, device=w.device)
    d = torch.zeros(w.shape[1], dtype=_DT, device=w.device)
    for _, ch in _row_chunks(w):
        c += ch.abs().sum(0)
        d += (ch != 0).sum(0).to(_DT)
    return c, d


def transition(w: torch.Tensor, p: torch.Tensor, theta: float) -> torch.Tensor:
    """M p with M = theta * |W|/c + (1 - theta) * A/d (column-stochastic, 0/0 -> 0), chunked."""
    p = p.to(device=w.device, dtype=_DT)
    if p.numel() != w.shape[1]:
        raise DataError(
            "prior", int(p.numel()), f"a vector with one entry per input of a {tuple(w.shape)} weight"
        )
    c, d = column_stats(w)
    pw = torch.where(c > 0, p / c.clamp_min(1e-300), torch.zeros_like(p))
    pd = torch.where(d > 0, p / d.clamp_min(1.0), torch.zeros_like(p))
    out = torch.empty(w.shape[0], dtype=_DT, device=w.device)
    for r, ch in _row_chunks(w):
        term = theta * (ch.abs() @ pw)
        if theta != 1:
            term += (1 - theta) * ((ch != 0).to(_DT) @ pd)
        out[r : r + ch.shape[0]] = term
    return out


def wpr_layer(
    w: torch.Tensor, prior: torch.Tensor, a_out: torch.Tensor, gamma: float, theta: float
) -> torch.Tensor:
    """One layer of the modified weighted PageRank: normalise(gamma M p + (1 - gamma) beta)."""
    if a_out.numel() != w.shape[0]:
        raise DataError(
            "stats",
            int(a_out.numel()),
            f"one activation norm per output of a {tuple(w.shape)} weight "
            "(statistics captured on this model)",
        )
    beta = normalise(a_out.to(w.device))
    if gamma == 0:
        return beta
    return normalise(gamma * transition(w, normalise(prior), theta) + (1 - gamma) * beta)


def wpr_chain(
    weights: list[torch.Tensor], a_in: torch.Tensor, a_outs: list[torch.Tensor], gamma: float, theta: float
) -> list[torch.Tensor]:
    """The exact fixed point on a chain of layers (a DAG): one sweep, p^(0) = normalise(a_in)."""
    p, out = normalise(a_in), []
    for w, a in zip(weights, a_outs):
        p = wpr_layer(w, p, a, gamma, theta)
        out.append(p)
    return out


def mpr_layer(w: torch.Tensor, prior: torch.Tensor, a_out: torch.Tensor) -> torch.Tensor:
    """The repo's ModifiedPageRank baseline: normalise((|W| p) * a_out), no transition normalising."""
    p = normalise(prior).to(w.device)
    out = torch.empty(w.shape[0], dtype=_DT, device=w.device)
    for r, ch in _row_chunks(w):
        out[r : r + ch.shape[0]] = ch.abs() @ p
    return normalise(out * a_out.to(device=w.device, dtype=_DT))


def keep_local(scores: torch.Tensor, ratio: float) -> list[int]:
    """Indices kept when the round(n * ratio) lowest scores are removed (ties: lower index goes first)."""
    n = scores.numel()
    k = min(n - 1, int(math.floor(n * ratio + 0.5)))
    order = torch.sort(scores.double().cpu(), stable=True).indices
    return sorted(order[max(0, k) :].tolist())


def keep_global(scores: list[torch.Tensor], ratio: float) -> list[list[int]]:
    """Global allocation with the per-layer normalisation bias corrected: compare n_l * s (each
    layer's mean becomes 1), remove the round(N * ratio) lowest overall, keep >= 1 per layer."""
    sizes = [s.numel() for s in scores]
    corrected = torch.cat(
        [s.double().cpu() * n / max(float(s.double().sum()), 1e-300) for s, n in zip(scores, sizes)]
    )
    layer_of = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(sizes)])
    local_idx = torch.cat([torch.arange(n) for n in sizes])
    order = torch.sort(corrected, stable=True).indices
    lay = layer_of[order]
    # rank of each candidate within its own layer (ascending order is preserved within a layer)
    onehot = torch.nn.functional.one_hot(lay, len(sizes))
    within = (onehot.cumsum(0) * onehot).sum(1) - 1
    eligible = within < torch.as_tensor(sizes)[lay] - 1
    k = int(math.floor(sum(sizes) * ratio + 0.5))
    removed = order[eligible][:k]
    keep = [set(range(n)) for n in sizes]
    for g in removed.tolist():
        keep[int(layer_of[g])].discard(int(local_idx[g]))
    return [sorted(s) for s in keep]


# ------------------------------------------------------------------------------------------------
# settings, scoring and selection on decoders
# ------------------------------------------------------------------------------------------------
Pipeline = Literal["isolated", "chained"]
Node = Literal["up", "down_in"]
Allocation = Literal["local", "global"]


class _FFNScheduleSettings(MethodSettings):
    """`schedule: search` for the FFN-channel rankers: each layer's FFN width comes from the search's
    per-layer tables (pruning_core/search.py), the channels kept in it by the method's scores; heads are
    never removed, so the tables' head units are not used."""

    allocation: Allocation = Field("local", description="'local' (uniform) or 'global'")
    schedule: Literal["uniform", "search"] = Field("uniform", description="uniform (allocation decides) or "
                                                   "search (per-layer FFN widths searched; allocation local)")
    search: SearchSettings = Field(default_factory=SearchSettings, description="settings of schedule: search")
    budget: Budget | None = Field(None, description="schedule: search under a serving-memory budget instead of ratio")
    targets: ClassVar[tuple[str, ...]] = ("ffn",)  # what the search may remove
    gqa: ClassVar[str] = "per_group"  # head units: unused (no heads are removed)

    @model_validator(mode="after")
    def _one_allocator(self):
        if self.schedule == "search" and self.allocation != "local":
            raise ValueError("allocation: local with schedule: search (the search allocates the widths)")
        return self


class LLMRankSettings(_FFNScheduleSettings):
    gamma: float = Field(0.5, ge=0.0, le=1.0, description="damping in [0, 1]; 0 = activation norm")
    theta: float = Field(0.5, ge=0.0, le=1.0, description="weight vs degree transition mix in [0, 1]")
    pipeline: Pipeline = Field("isolated", description="'isolated' or 'chained'")
    node: Node = Field("down_in", description="'up' (up_proj output) or 'down_in' (down_proj input)")


class MPRSettings(_FFNScheduleSettings):
    pipeline: Pipeline = Field("chained", description="'isolated' or 'chained'")
    node: Node = Field("up", description="'up' (up_proj output) or 'down_in' (down_proj input)")


def _norm(stats: dict, key: str) -> torch.Tensor:
    if key not in stats:
        raise DataError(
            "stats", key, "statistics from pruning_core.capture.capture_stats (per-layer sums of squares)"
        )
    return stats[key].to(_DT).clamp_min(0).sqrt()


def _decoder_layers(model, adapter):
    """(index, layer) of the decoder layers (shapes only; weights come through `engine.visit_layers`)."""
    for i, layer in enumerate(adapter.layers(model)):
        if getattr(layer, "pruneflow_kind", "decoder") == "decoder":
            yield i, layer


def rank_ffn(model, adapter, stats: dict, settings, kind: str = "wpr") -> dict[str, torch.Tensor]:
    """Scores {"ffn.{i}": [d_ff]} of every decoder layer's FFN channels (higher = more important)."""
    node_key = "up_out_sq" if settings.node == "up" else "mlp_in_sq"
    chained = settings.pipeline == "chained"
    gamma = getattr(settings, "gamma", 0.0)
    theta = getattr(settings, "theta", 0.5)
    scores: dict[str, torch.Tensor] = {}
    state = {"prior": None}  # importance of the residual-stream nodes entering the next FFN (chained)

    def visit(i, layer):  # the engine brings each decoder layer once, in order
        up = adapter.proj(layer, adapter.mlp_in[-1]).weight.detach()
        down = adapter.proj(layer, adapter.mlp_out).weight.detach()
        node = _norm(stats, f"layer.{i}.{node_key}")
        prior = state["prior"]
        if prior is None or not chained:
            prior = _norm(stats, f"layer.{i}.mlp_x_sq")
        if kind == "wpr":
            p_up = wpr_layer(up, prior, node, gamma, theta)
        else:
            p_up = mpr_layer(up, prior, node)
        scores[f"ffn.{i}"] = p_up.float().cpu()
        if chained and (kind != "wpr" or gamma > 0):
            out = _norm(stats, f"layer.{i}.mlp_out_sq")
            prior = wpr_layer(down, p_up, out, gamma, theta) if kind == "wpr" else mpr_layer(down, p_up, out)
        state["prior"] = prior

    with torch.no_grad():
        visit_layers(model, adapter, visit, only_decoders=True)
    return scores


def _score_wpr(model, adapter, stats, settings):
    return rank_ffn(model, adapter, stats, settings, kind="wpr")


def _score_mpr(model, adapter, stats, settings):
    return rank_ffn(model, adapter, stats, settings, kind="mpr")


def select_ffn(model, adapter, scores: dict, ratio: float, settings, method: str = "llm-rank") -> PrunePlan:
    """A PrunePlan keeping the highest-scoring FFN channels (local or global allocation)."""
    r = check_ratio(ratio)
    if settings.schedule == "search":
        raise needs_tables(method)
    idx = [i for i, _ in _decoder_layers(model, adapter)]
    missing = [i for i in idx if f"ffn.{i}" not in scores]
    if missing:
        raise DataError("scores", f"ffn.{missing[0]}", "scores for every decoder layer's FFN (ffn.{i})")
    if settings.allocation == "local":
        plan = plan_from_scores(
            model, adapter, scores, r, targets=("ffn",), method=method, settings=settings.model_dump()
        )
    else:
        keeps = dict(zip(idx, keep_global([scores[f"ffn.{i}"] for i in idx], ffn_unit_ratio(model, adapter, r))))
        lps = [LayerPlan(i, ffn=keeps.get(i)) for i in range(len(adapter.layers(model)))]
        plan = PrunePlan(method=method, settings=settings.model_dump(), layers=lps, target_ratio=r)
        sizes = unit_sizes(model, adapter)  # realised fraction of each layer's parameters
        plan.per_layer_ratio = [
            0.0 if i not in keeps else (scores[f"ffn.{i}"].numel() - len(keeps[i])) * sizes[i]["ch_params"]
            / sizes[i]["total"] for i in range(len(lps))
        ]
        plan.params_before, plan.params_after = plan_params(model, plan)
    plan.notes.update({"unit": "ffn channel", "allocation": settings.allocation})
    return plan


def _select_wpr(model, adapter, scores, ratio, settings):
    return select_ffn(model, adapter, scores, ratio, settings, method="llm-rank")


def _select_mpr(model, adapter, scores, ratio, settings):
    return select_ffn(model, adapter, scores, ratio, settings, method="mpr")


register(
    Method(
        name="llm-rank",
        summary="weighted PageRank over the FFN graph (activation norms as teleport); removes FFN channels",
        settings=LLMRankSettings,
        paper="Hoffmann et al., LLM-Rank, arXiv 2410.13299 (Sec. 3; MLP-Rank eq. for weighted PageRank)",
        targets=("ffn",),
        needs=frozenset(),
        score=_score_wpr,
        select=_select_wpr,
    )
)
register(
    Method(
        name="mpr",
        summary="modified PageRank baseline of LLM-Rank's code: (|W| p) * activation norm; removes FFN channels",
        settings=MPRSettings,
        paper="Hoffmann et al., LLM-Rank, arXiv 2410.13299 (code baseline ModifiedPageRank)",
        targets=("ffn",),
        needs=frozenset(),
        score=_score_mpr,
        select=_select_mpr,
    )
)
