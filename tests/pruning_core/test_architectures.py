"""Every registered method on every supported architecture: prune -> save -> reload gives exactly
the logits of the zero-masked model (what the plan removes zeroed in place; FLAP: its compensated
model, whose o_proj / down_proj biases must survive the reload)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from pruning_core import (
    adapter_for,
    apply_plan,
    capture_stats,
    is_uniform,
    list_methods,
    load_pruned,
    save_pruned,
)
from pruning_core.models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("llama", "qwen2", "mistral", "opt")
# sliding windows shorter than the 24-32 token blocks, so the masks matter: Qwen2 mixes full
# attention (layers 0-1) with sliding-window layers (2-3), Mistral slides everywhere
CONFIGS = {"qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=2),
           "mistral": dict(sliding_window=8)}
RATIO = 0.25
# settings that keep a tiny test fast; every other setting is the method's default
SETTINGS = {"llm-streamline": {"steps": 0}}
CALIB = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(3))
IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(4))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def run_method(method, model):
    """The method's plan on `model` (a coupled method also updates the weights in place)."""
    adapter = adapter_for(model)
    settings = method.parse_settings(SETTINGS.get(method.name))
    if method.coupled:
        return method.prune(model, adapter, CALIB, RATIO, settings, device="cpu")
    stats = capture_stats(model, adapter, CALIB, requests=method.needs & {"attn_gram", "mlp_gram", "cosine"})
    return method.select(model, adapter, method.score(model, adapter, stats, settings), RATIO, settings)


@torch.no_grad()
def zero_masked(model, plan):
    """A copy of `model` with what `plan` removes zeroed: removed heads' o_proj columns, removed FFN
    channels' down_proj columns, removed layers' output projections (weights and biases)."""
    m = copy.deepcopy(model)
    a = adapter_for(m)
    hd = a.head_dim(m)
    for lp, layer in zip(plan.layers, a.layers(m)):
        o, down = a.proj(layer, a.o), a.proj(layer, a.mlp_out)
        if not lp.keep:
            for lin in (o, down):
                lin.weight.zero_()
                if lin.bias is not None:
                    lin.bias.zero_()
            continue
        if lp.heads is not None:
            for h in set(range(o.in_features // hd)) - set(lp.heads):
                o.weight[:, h * hd:(h + 1) * hd] = 0
        if lp.ffn is not None:
            gone = sorted(set(range(down.in_features)) - set(lp.ffn))
            down.weight[:, gone] = 0
    return m


def removes_something(plan) -> bool:
    return any(not lp.keep or lp.heads is not None or lp.ffn is not None for lp in plan.layers)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", [m.name for m in list_methods()])
def test_prune_save_reload_equals_zero_masked(name, family, tmp_path):
    method = next(m for m in list_methods() if m.name == name)
    model = tiny_model(family, n_layers=4, seed=1, **CONFIGS.get(family, {}))
    plan = run_method(method, model)
    assert removes_something(plan), f"{name} removed nothing on {family}"
    ref = logits(zero_masked(model, plan))
    apply_plan(model, plan)
    torch.testing.assert_close(logits(model), ref, atol=1e-5, rtol=1e-5)
    path = save_pruned(model, None, plan, tmp_path / "ck")
    again, _ = load_pruned(path)
    torch.testing.assert_close(logits(again), ref, atol=1e-5, rtol=1e-5)
    if is_uniform(path):  # a stock checkpoint: plain transformers gives the same logits
        stock = AutoModelForCausalLM.from_pretrained(path).eval()
        torch.testing.assert_close(logits(stock), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_flap_compensation_bias_survives_reload(family, tmp_path):
    """FLAP's compensation is its bias: after the reload o_proj / down_proj carry the same nonzero
    biases, and the logits differ from those of the same model without them."""
    method = next(m for m in list_methods() if m.name == "flap")
    model = tiny_model(family, n_layers=4, seed=1, **CONFIGS.get(family, {}))
    plan = run_method(method, model)
    a = adapter_for(model)
    apply_plan(model, plan)
    biases = {(i, n): a.proj(la, n).bias.detach().clone()
              for i, la in enumerate(a.layers(model)) for n in (a.o, a.mlp_out)}
    assert any(float(b.abs().max()) > 1e-4 for b in biases.values())
    again, _ = load_pruned(save_pruned(model, None, plan, tmp_path / "ck"))
    for (i, n), b in biases.items():
        got = a.proj(a.layers(again)[i], n).bias
        assert got is not None, f"{family}: layer {i} {n} lost its bias"
        torch.testing.assert_close(got, b, atol=0, rtol=0)
    stripped = copy.deepcopy(again)
    with torch.no_grad():
        for la in a.layers(stripped):
            for n in (a.o, a.mlp_out):
                a.proj(la, n).bias.zero_()
    assert not torch.allclose(logits(stripped), logits(again), atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_flap_without_sliding_windows_saves_a_stock_llama(family, tmp_path):
    """Qwen2 / Mistral with no sliding-window layer compute what Llama does: FLAP's checkpoint is
    then a stock Llama (attention_bias / mlp_bias on) that plain transformers loads with the
    compensated logits; with a sliding window it stays a pruneflow checkpoint (the test above)."""
    method = next(m for m in list_methods() if m.name == "flap")
    model = tiny_model(family, n_layers=4, seed=1)  # Qwen2: no sliding window; Mistral: window 4096 > 256
    plan = run_method(method, model)
    ref = logits(model)
    apply_plan(model, plan)
    assert type(model).__name__.lower().startswith(family)
    path = save_pruned(model, None, plan, tmp_path / "ck")
    assert is_uniform(path)
    stock = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(stock).__name__ == "LlamaForCausalLM"
    assert stock.config.attention_bias and stock.config.mlp_bias
    torch.testing.assert_close(logits(stock), ref, atol=1e-5, rtol=1e-5)
    o = adapter_for(stock).proj(adapter_for(stock).layers(stock)[0], "o_proj")
    assert float(o.bias.detach().abs().max()) > 1e-4  # the compensation, not a zero placeholder
