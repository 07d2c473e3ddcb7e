"""The `servable: vllm` planning constraint: the same query-head count in every layer, for every method,
at the same parameter budget; `plan` reports what it changes; the result exports to vLLM's format."""

from __future__ import annotations

import copy

import pytest
import torch

from pruning_core.adapters import adapter_for
from pruning_core.methods import get_method, list_methods
from pruning_core.models import tiny_model
from pruning_core.select import solve_schedule
from pruning_core.surgery import apply_plan

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(n_layers=6):
    return tiny_model("llama", n_layers=n_layers, hidden_size=64, intermediate_size=128, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=16)


def _heads(model):
    a = adapter_for(model)
    return [s.n_heads for s in a.shapes(model) if s.kind == "decoder"]


def test_every_method_accepts_the_setting():
    for m in list_methods():
        assert m.parse_settings({"servable": "vllm"}).servable == "vllm"
        assert m.parse_settings({}).servable == "none"


@pytest.mark.parametrize("gqa", ["kv_group", "per_group"])
def test_slimgpt_schedule_uniform_heads_same_budget(gqa):
    m = _model(12)
    a = adapter_for(m)
    free = solve_schedule(m, a, 0.3, "log_increase", 0.25, gqa)
    fixed = solve_schedule(m, a, 0.3, "log_increase", 0.25, gqa, uniform_heads=True)
    assert len(set(free["heads"])) > 1  # the log schedule alone varies the head counts
    assert len(set(fixed["heads"])) == 1
    assert fixed["heads"][0] == int(sum(free["heads"]) / len(free["heads"]) + 0.5)
    assert fixed["ffn"] != free["ffn"] and fixed["ffn"] == sorted(fixed["ffn"])  # FFN still log-increasing
    assert abs(fixed["realised"] - 0.3) < 0.005 and abs(free["realised"] - 0.3) < 0.005


def _calib():
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name,settings", [
    ("slimgpt", {}), ("slimgpt", {"gqa": "per_group"}), ("flap", {"structure": "al_am"}), ("flap", {}),
])
def test_coupled_methods_keep_equal_heads(name, settings):
    meth = get_method(name)
    out = {}
    for servable in ("none", "vllm"):
        m = _model()
        st = meth.parse_settings({**settings, "servable": servable})
        plan = meth.prune(m, adapter_for(m), _calib(), 0.3, st)
        small = apply_plan(copy.deepcopy(m), plan)
        out[servable] = (plan, _heads(small))
    assert len(set(out["vllm"][1])) == 1, out["vllm"][1]
    assert out["vllm"][0].settings["servable"] == "vllm"
    budget = out["none"][0].params_after
    assert abs(out["vllm"][0].params_after - budget) / budget < 0.03


@pytest.mark.parametrize("name", ["wanda", "l2", "random"])
def test_score_then_select_methods_keep_equal_heads(name):
    meth = get_method(name)
    m = _model()
    a = adapter_for(m)
    g = torch.Generator().manual_seed(1)
    scores = {}
    for i, s in enumerate(a.shapes(m)):
        scores[f"heads.{i}"], scores[f"ffn.{i}"] = torch.rand(s.n_heads, generator=g), torch.rand(s.ffn, generator=g)
    heads = {}
    for servable in ("none", "vllm"):
        st = meth.parse_settings({"schedule": "log_increase", "servable": servable})
        heads[servable] = _heads(apply_plan(copy.deepcopy(m), meth.select(m, a, scores, 0.3, st)))
    assert len(set(heads["none"])) > 1 and len(set(heads["vllm"])) == 1
