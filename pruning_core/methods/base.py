"""The method interface and its registry.

A method is one module in `pruning_core/methods/`: a pydantic settings model (unknown keys
rejected), pure scoring maths on tensors, and one `register(Method(...))` line. Two shapes exist:

* **score-then-select** (`score` + `select`): scores depend on model + calibration statistics +
  scoring settings, *not* on the ratio, so a sweep over ratios reuses them ("score once, prune
  many"). `select` turns scores and a ratio into a `PrunePlan`; surgery applies it.
* **coupled** (`prune`): selection and weight update are interleaved (SlimGPT's sequential OBS).
  `prune` consumes the calibration token blocks directly, updates surviving weights in place and
  returns the plan; surgery then removes the dead structures.

Statistics a score-then-select method needs are named in `needs` and produced by
`capture.capture_stats` (see its docstring for the keys).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError, validated

Scores = dict[str, torch.Tensor]  # e.g. {"heads.3": [n_q], "ffn.3": [d_ff], "layers": [L]}


class MethodSettings(BaseModel):
    """Base for every method's settings: unknown keys are an error, values are validated.

    `servable` is the planning constraint every method honours: `vllm` keeps the same number of query
    heads in every layer (vLLM's per-layer DeciLM format has one global query-head count; KV heads and
    FFN widths stay free per layer), so the result can be exported with `pruneflow export --format vllm`.
    """

    model_config = ConfigDict(extra="forbid")
    servable: Literal["none", "vllm"] = Field(
        "none", description="none, or vllm: the same number of query heads in every layer (FFN widths free)")


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    settings: type[MethodSettings]
    paper: str = ""
    targets: tuple[str, ...] = ("heads", "ffn")  # what it removes: heads, ffn, layers
    needs: frozenset[str] = frozenset()  # capture requests (see capture.REQUESTS)
    # score(model, adapter, stats, settings) -> Scores
    score: Callable[..., Scores] | None = None
    # select(model, adapter, scores, ratio, settings) -> PrunePlan
    select: Callable[..., Any] | None = None
    # prune(model, adapter, calib_ids, ratio, settings, device=...) -> PrunePlan (coupled methods)
    prune: Callable[..., Any] | None = None
    # optional, coupled methods: sizes(model, adapter, ratio, settings) -> PrunePlan with the kept *sizes*
    # (not the data-chosen indices), so `pruneflow plan` shows them without calibration data
    sizes: Callable[..., Any] | None = None
    # optional, methods that score hidden-state cosines: cosine_span(model, adapter, ratios, settings) -> the
    # largest layer distance they compare at these ratios, so capture keeps only that many states
    cosine_span: Callable[..., int] | None = None

    @property
    def coupled(self) -> bool:
        return self.prune is not None

    def parse_settings(self, raw: dict | None) -> MethodSettings:
        return validated(self.settings, raw, "method.settings")


REGISTRY: dict[str, Method] = {}
# every method module registers itself on import (a plugin registry: they import this module)
_MODULES = ("baselines", "llm_rank", "streamline", "slimgpt", "flap")
_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for m in _MODULES:
        importlib.import_module(f"{__package__}.{m}")


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} registered twice")
    if not method.coupled and (method.score is None or method.select is None):
        raise ValueError(f"method {method.name!r} needs score+select or prune")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    _load_all()
    if name not in REGISTRY:
        raise ConfigError("method.name", name, ", ".join(sorted(REGISTRY)))
    return REGISTRY[name]


def list_methods() -> list[Method]:
    _load_all()
    return [REGISTRY[k] for k in sorted(REGISTRY)]
