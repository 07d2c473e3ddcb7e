"""PNG plots from plain data: real files with the expected size, user errors for unusable input."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pruning_core import plots
from pruning_core.errors import DataError
from pruning_core.plan import LayerPlan, PrunePlan

PNG = b"\x89PNG\r\n\x1a\n"


def _png(path):
    assert path.read_bytes()[:8] == PNG
    w, h = Image.open(path).size
    assert w > 200 and h > 150
    return w, h


def test_kept_per_layer_from_a_plan_dict(tmp_path):
    plan = PrunePlan("slimgpt", {}, [LayerPlan(0, heads=[0, 1, 2], kv_heads=[0], ffn=list(range(10))),
                                     LayerPlan(1, keep=False), LayerPlan(2, replacement={"kind": "ffn"}),
                                     LayerPlan(3)]).to_dict()
    out = plots.plot_kept_per_layer(plan, tmp_path / "a" / "kept.png", full={"heads": 4, "kv_heads": 2, "ffn": 16})
    _png(out)
    assert not list(tmp_path.glob("a/.*tmp"))  # atomic write leaves no temporary
    with pytest.raises(DataError, match="plan.layers"):
        plots.plot_kept_per_layer({"layers": []}, tmp_path / "x.png")


def test_scores_sweep_and_loss_plots(tmp_path):
    scores = {f"heads.{i}": torch.rand(4) for i in range(3)} | {f"ffn.{i}": [0.1 * j for j in range(16)] for i in range(3)}
    scores["meta"] = [1.0]  # ignored: not "<kind>.<layer>"
    w1, h1 = _png(plots.plot_scores_per_layer(scores, tmp_path / "s.png"))
    w2, h2 = _png(plots.plot_scores_per_layer({"ffn.0": [1.0, 2.0]}, tmp_path / "s1.png"))
    assert h1 > h2  # one panel per unit kind
    pts = [{"method": m, "ratio": r, "ppl": 10 / (1 - r), "acc": 0.5 - r / 4} for m in ("a", "b") for r in (0.1, 0.2)]
    ws, _ = _png(plots.plot_sweep(pts, tmp_path / "sweep.png"))
    wp, _ = _png(plots.plot_sweep([{k: v for k, v in p.items() if k != "acc"} for p in pts], tmp_path / "p.png"))
    assert ws > wp  # the accuracy panel is left out when no point has it
    _png(plots.plot_loss_curves([3.0, 2.0, 1.5], tmp_path / "loss.png"))
    _png(plots.plot_loss_curves({"block 3-6": [1.0, 0.5], "lora": [2.0, 1.0, 0.9]}, tmp_path / "loss2.png"))
    with pytest.raises(DataError, match="scores"):
        plots.plot_scores_per_layer({"x": [1.0]}, tmp_path / "bad.png")
    with pytest.raises(DataError, match="sweep.metrics"):
        plots.plot_sweep([{"method": "a", "ratio": 0.1}], tmp_path / "bad.png")
    with pytest.raises(DataError, match="recovery.losses"):
        plots.plot_loss_curves([], tmp_path / "bad.png")
