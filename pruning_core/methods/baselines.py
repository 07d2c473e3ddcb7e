"""Baseline scorers for attention heads and FFN channels (what the three papers compare against).

* `random`     seeded uniform scores.
* `l1`, `l2`   magnitude of every weight that belongs to the unit: a head's q rows and o_proj
               columns (plus its share of the k/v rows), an FFN channel's gate/up rows and down column.
* `activation` L2 norm over calibration tokens of the unit's input to o_proj / down_proj.
* `wanda`      structured Wanda (FLAP's `wanda_sp`): per input channel j of o_proj / down_proj,
               mean_r |W_rj| * ||x_j||; a head sums its channels.

All are score-then-select with a uniform (or scheduled) per-layer ratio.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..engine import visit_layers
from ..search import Budget, SearchSettings, needs_tables
from ..select import layer_ratios, plan_from_scores
from .base import Method, MethodSettings, register


class BaselineSettings(MethodSettings):
    targets: list[Literal["heads", "ffn"]] = ["heads", "ffn"]
    gqa: Literal["kv_group", "per_group"] = "kv_group"
    schedule: str = "uniform"  # a select.SCHEDULES name, or search (pruning_core/search.py; needs its tables)
    seed: int = 0
    search: SearchSettings = Field(default_factory=SearchSettings, description="settings of schedule: search")
    budget: Budget | None = Field(None, description="schedule: search under a serving-memory budget instead of ratio")


def _per_head(v: torch.Tensor, hd: int) -> torch.Tensor:
    return v.view(-1, hd).sum(1)


def _magnitude(model, adapter, p: int) -> dict[str, torch.Tensor]:
    out = {}
    hd = adapter.head_dim(model)

    def visit(i, layer):  # one layer's weights at a time (the engine brings each once)
        s = adapter.layer_shape(model, layer)
        rep = s.n_heads // s.n_kv_heads

        def m(w, dim):
            w = w.detach().float()
            return (w.abs() ** p).sum(dim)

        q = _per_head(m(adapter.proj(layer, adapter.q).weight, 1), hd)
        o = _per_head(m(adapter.proj(layer, adapter.o).weight, 0), hd)
        kv = _per_head(m(adapter.proj(layer, adapter.k).weight, 1) + m(adapter.proj(layer, adapter.v).weight, 1), hd)
        out[f"heads.{i}"] = (q + o + kv.repeat_interleave(rep) / rep) ** (1.0 / p)
        f = m(adapter.proj(layer, adapter.mlp_out).weight, 0)
        for name in adapter.mlp_in:
            f = f + m(adapter.proj(layer, name).weight, 1)
        out[f"ffn.{i}"] = f ** (1.0 / p)

    visit_layers(model, adapter, visit)
    return out


def _activation(model, adapter, stats, wanda: bool) -> dict[str, torch.Tensor]:
    out = {}
    hd = adapter.head_dim(model)

    def visit(i, layer):
        a = stats[f"layer.{i}.attn_in_sq"].float().sqrt()
        f = stats[f"layer.{i}.mlp_in_sq"].float().sqrt()
        if wanda:
            a = a * adapter.proj(layer, adapter.o).weight.detach().float().abs().mean(0).cpu()
            f = f * adapter.proj(layer, adapter.mlp_out).weight.detach().float().abs().mean(0).cpu()
            out[f"heads.{i}"] = _per_head(a, hd)
        else:
            out[f"heads.{i}"] = _per_head(a * a, hd).sqrt()
        out[f"ffn.{i}"] = f

    visit_layers(model, adapter, visit, read_weights=wanda)
    return out


def _random(model, adapter, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, s in enumerate(adapter.shapes(model)):
        out[f"heads.{i}"] = torch.rand(s.n_heads, generator=g)
        out[f"ffn.{i}"] = torch.rand(s.ffn, generator=g)
    return out


def _select(model, adapter, scores, ratio, settings: BaselineSettings, name: str):
    if settings.schedule == "search":
        raise needs_tables(name)
    per_layer = layer_ratios(settings.schedule, ratio, len(adapter.layers(model)))
    return plan_from_scores(model, adapter, scores, ratio, targets=tuple(settings.targets), gqa=settings.gqa,
                            per_layer=per_layer, method=name, settings=settings.model_dump(),
                            uniform_heads=settings.servable == "vllm")


def _make(name: str, summary: str, score, data_free: bool) -> Method:
    return register(Method(
        name=name, summary=summary, settings=BaselineSettings, targets=("heads", "ffn"),
        needs=frozenset() if data_free else frozenset({"norms"}),
        score=score, select=lambda m, a, sc, r, st, _n=name: _select(m, a, sc, r, st, _n),
        paper="baseline",
    ))


_make("random", "seeded random scores (baseline)", lambda m, a, stats, s: _random(m, a, s.seed), True)
_make("l1", "L1 magnitude of each head's / channel's weights (baseline)", lambda m, a, stats, s: _magnitude(m, a, 1), True)
_make("l2", "L2 magnitude of each head's / channel's weights (baseline)", lambda m, a, stats, s: _magnitude(m, a, 2), True)
_make("activation", "L2 norm of the unit's calibration activations (baseline)",
      lambda m, a, stats, s: _activation(m, a, stats, wanda=False), False)
_make("wanda", "structured Wanda (FLAP's wanda_sp): mean |W| x activation norm per input channel (baseline)",
      lambda m, a, stats, s: _activation(m, a, stats, wanda=True), False)
