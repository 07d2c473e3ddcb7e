"""FLAP: bias compensation is the least-squares constant; pruning keeps a stock-loadable Llama."""

from __future__ import annotations

import copy

import pytest
import torch

from pruning_core.adapters import adapter_for
from pruning_core.errors import ConfigError
from pruning_core.methods import get_method
from pruning_core.methods.flap import FLAPSettings, channel_metric, flap_bias, prune
from pruning_core.models import tiny_model
from pruning_core.surgery import apply_plan, count_params


def test_bias_is_the_least_squares_optimal_constant_offset():
    g = torch.Generator().manual_seed(0)
    d_in, d_out, T = 10, 6, 300
    X = torch.randn(d_in, T, generator=g, dtype=torch.float64) + torch.linspace(-2, 2, d_in, dtype=torch.float64)[:, None]
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    S = torch.tensor([1, 4, 7])
    R = torch.tensor([i for i in range(d_in) if i not in S.tolist()])
    b = flap_bias(W, X.mean(1), S)
    # least squares: min_b || W X - W_R X_R - b 1ᵀ ||²  ->  regress the residual on a constant
    resid = (W[:, S] @ X[S]).T  # [T, d_out]
    b_ls = torch.linalg.lstsq(torch.ones(T, 1, dtype=torch.float64), resid).solution[0]
    torch.testing.assert_close(b, b_ls, rtol=1e-10, atol=1e-10)

    def loss(bb):
        return float(((W @ X - W[:, R] @ X[R] - bb[:, None]) ** 2).sum())

    assert loss(b) < loss(torch.zeros(d_out, dtype=torch.float64))
    for _ in range(5):
        assert loss(b) <= loss(b + 1e-3 * torch.randn(d_out, generator=g, dtype=torch.float64))


def test_metrics():
    W = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    mean, var, sq = torch.tensor([0.0, 1.0]), torch.tensor([2.0, 0.5]), torch.tensor([4.0, 9.0])
    assert channel_metric("wifv", W, mean, var, sq).tolist() == [20.0, 2.0]
    assert channel_metric("ifv", W, mean, var, sq).tolist() == [2.0, 0.5]
    assert channel_metric("wifn", W, mean, var, sq).tolist() == [4.0, 3.0]


def _model():
    return tiny_model("llama", n_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2)


@pytest.mark.parametrize("settings", [dict(), dict(gqa="per_group"), dict(structure="al_am"),
                                      dict(metric="wifn", bias_compensation=False)])
def test_pruned_model_equals_masked_model_and_reloads_as_stock_llama(settings, tmp_path):
    m = _model()
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = m(input_ids=ids).logits
    plan = prune(m, adapter_for(m), ids, 0.3, FLAPSettings(**settings))
    with torch.no_grad():
        masked = m(input_ids=ids).logits
    assert not torch.allclose(dense, masked, atol=1e-3)
    small = apply_plan(copy.deepcopy(m), plan)
    assert count_params(small) == plan.params_after < plan.params_before
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=ids).logits, masked, atol=1e-5, rtol=1e-5)
    removed = 1 - plan.params_after / plan.params_before
    assert 0.1 < removed < 0.35
    has_bias = settings.get("bias_compensation", True)
    assert (small.model.layers[0].mlp.down_proj.bias is not None) == has_bias
    if has_bias and settings.get("structure", "uniform") == "uniform":
        from transformers import AutoModelForCausalLM

        assert small.config.attention_bias and small.config.mlp_bias
        small.save_pretrained(tmp_path)
        again = AutoModelForCausalLM.from_pretrained(tmp_path)
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids=ids).logits, masked, atol=1e-5, rtol=1e-5)


def test_bias_compensation_reduces_the_output_error():
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    base = _model()
    with torch.no_grad():
        dense = base(input_ids=ids).logits
    errs = {}
    for bias in (True, False):
        m = copy.deepcopy(base)
        prune(m, adapter_for(m), ids, 0.3, FLAPSettings(bias_compensation=bias))
        with torch.no_grad():
            errs[bias] = float((m(input_ids=ids).logits - dense).norm())
    assert errs[True] < errs[False]


def test_registered_and_validated():
    meth = get_method("flap")
    assert meth.coupled
    with pytest.raises(ConfigError, match="method.settings.metric"):
        meth.parse_settings({"metric": "l3"})
    assert FLAPSettings().gqa == "kv_group" and FLAPSettings(structure="al_am").gqa == "kv_group"
    with pytest.raises(ConfigError, match="gqa"):
        prune(_model(), adapter_for(_model()), torch.zeros(2, 8, dtype=torch.long), 0.2,
              FLAPSettings(structure="al_am", gqa="per_group"))
