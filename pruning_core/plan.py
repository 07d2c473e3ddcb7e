"""The prune plan: what survives in every layer. Human-readable JSON, applied by `surgery`.

Per layer: whether the layer is kept, the kept query heads and KV groups, the kept FFN channels and
an optional replacement module (LLM-Streamline). Indices refer to the *input* model's numbering.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LayerPlan:
    index: int
    keep: bool = True
    heads: list[int] | None = None  # kept query heads (None: all)
    kv_heads: list[int] | None = None  # kept KV heads (None: all)
    ffn: list[int] | None = None  # kept FFN channels (None: all)
    replacement: dict[str, Any] | None = None  # e.g. {"kind": "ffn"} (module built by surgery)


@dataclass
class PrunePlan:
    method: str
    settings: dict[str, Any]
    layers: list[LayerPlan]
    target_ratio: float | None = None
    params_before: int | None = None
    params_after: int | None = None
    per_layer_ratio: list[float] | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    # -- helpers ---------------------------------------------------------------------------------
    @classmethod
    def identity(cls, n_layers: int, method: str = "none", settings: dict | None = None) -> PrunePlan:
        return cls(method=method, settings=settings or {}, layers=[LayerPlan(i) for i in range(n_layers)])

    def kept_layers(self) -> list[LayerPlan]:
        return [lp for lp in self.layers if lp.keep]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrunePlan:
        d = dict(d)
        d["layers"] = [LayerPlan(**lp) for lp in d["layers"]]
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> PrunePlan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> PrunePlan:
        return cls.from_json(Path(path).read_text())
