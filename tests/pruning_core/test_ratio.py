"""`ratio` means one thing for every method: the fraction of decoder-layer parameters removed.

Each registered method prunes the same tiny Llama (10 layers, 8 q / 2 KV heads, 256 FFN channels) at
ratio 0.2 through `pruning_core.prune`; the realised fraction of decoder-layer parameters removed
(counted on the pruned model) must be within half a layer's FFN-channel granularity of 0.2 for
width methods, and exactly 2 of 10 layers for depth methods.
"""

from __future__ import annotations

import copy

import pytest
import torch

import pruning_core as pc
from pruning_core.adapters import adapter_for
from pruning_core.select import removal_counts, unit_sizes

pytestmark = pytest.mark.usefixtures("one_thread")


def _decoder(model) -> int:
    return sum(p.numel() for layer in adapter_for(model).layers(model) for p in layer.parameters())


@pytest.fixture(scope="module")
def dense():
    return pc.tiny_model("llama", n_layers=10, seed=3, intermediate_size=256, num_attention_heads=8,
                         num_key_value_heads=2)


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))


WIDTH = ["wanda", "l1", "l2", "random", "activation", "llm-rank", "mpr", "slimgpt", "flap"]
DEPTH = ["llm-streamline", "shortgpt"]


@pytest.mark.parametrize("method", WIDTH + DEPTH)
def test_every_method_removes_the_ratio_of_decoder_parameters(dense, calib, method):
    m = copy.deepcopy(dense)
    before = _decoder(m)
    settings = {"replacement": "none"} if method == "llm-streamline" else None
    plan = pc.prune(m, method, calib, 0.2, settings)
    realised = (before - _decoder(m)) / before
    if method in DEPTH:
        assert realised == pytest.approx(0.2, abs=1e-12)  # 2 whole layers of 10
        assert "2 of 10 layers removed" in plan.notes["rounding"]
    else:
        ch = unit_sizes(dense, adapter_for(dense))[0]["ch_params"] / (before / 10)  # one channel, as a fraction
        # FLAP's adaptive search (its own rule, methods/flap.py) removes whole head / channel units greedily
        # and stops under its budget: within 1.5 points on this coarse model (one KV group = 0.86 %)
        tol = 0.015 if method == "flap" else max(ch, 0.002)
        assert abs(realised - 0.2) <= tol, (method, realised)


def test_heads_round_then_ffn_absorbs_exactly():
    sizes = [{"total": 1000, "n_units": 4, "unit_params": 100, "unit": "KV group", "ffn": 50, "ch_params": 10}]
    # 0.3 of 1000 = 300: round(4 x 0.3) = 1 group (100), then 200 / 10 = 20 channels
    assert removal_counts(sizes, [0.3], ("heads", "ffn")) == [(1, 20)]
    assert removal_counts(sizes, [0.3], ("ffn",)) == [(0, 30)]  # FFN only: the whole share in channels
    assert removal_counts(sizes, [0.3], ("heads",)) == [(3, 0)]  # heads only: 300 / 100 units
    assert removal_counts(sizes, [0.0], ("heads", "ffn")) == [(0, 0)]
