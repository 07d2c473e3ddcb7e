"""Efficiency measurement: same protocol for dense and pruned, exact accounting parts."""

from __future__ import annotations

import pytest
import torch

from pruning_core.efficiency import _decode, _prefill, measure, measure_pair, model_bytes
from pruning_core.errors import ConfigError
from pruning_core.metrics import flops_per_token
from pruning_core.models import tiny_model
from pruning_core.plan import LayerPlan, PrunePlan
from pruning_core.surgery import apply_plan, count_params

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair():
    dense = tiny_model("llama", n_layers=2, seed=3)
    pruned = tiny_model("llama", n_layers=2, seed=3)
    plan = PrunePlan("t", {}, [LayerPlan(0, heads=[0, 1], kv_heads=[0], ffn=list(range(48))), LayerPlan(1, ffn=list(range(48)))])
    return dense, apply_plan(pruned, plan)


def test_measure_fields_and_exact_parts():
    dense, _ = _pair()
    r = measure(dense, prompt_len=16, new_tokens=4, repeats=2)
    assert r["params"] == count_params(dense)
    assert r["flops_per_token"] == flops_per_token(dense)
    assert r["prefill_ms"] > 0 and r["decode_tokens_per_s"] > 0
    weights = sum(p.numel() * 4 for p in dense.parameters()) + sum(b.numel() * b.element_size() for b in dense.buffers())
    assert r["weights_mb"] == pytest.approx(weights / 2**20)
    assert r["peak_mem_mb"] >= r["weights_mb"]
    assert r["settings"]["device"] == "cpu" and r["settings"]["new_tokens"] == 4


def test_tied_weights_counted_once():
    m = tiny_model("llama", n_layers=1, tie_word_embeddings=True)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    distinct = {p.data_ptr(): p for p in m.parameters()}
    assert model_bytes(m) == sum(p.numel() * 4 for p in distinct.values()) + sum(b.numel() * b.element_size() for b in m.buffers())


def test_cached_decode_equals_greedy_generate():
    m = tiny_model("llama", n_layers=2, seed=5)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    logits, past = _prefill(m, ids)
    last = _decode(m, logits, past, 5)
    with torch.no_grad():
        gen = m.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=0)
    # prefill gives token 1, five cached steps give tokens 2..6
    assert int(last) == int(gen[0, -1])


def test_pair_same_settings_and_ratios():
    dense, pruned = _pair()
    out = measure_pair(dense, pruned, prompt_len=16, new_tokens=4, repeats=1)
    assert out["dense"]["settings"] == out["pruned"]["settings"]
    assert out["speedup"]["params"] == pytest.approx(count_params(dense) / count_params(pruned))
    assert out["pruned"]["flops_per_token"] < out["dense"]["flops_per_token"]
    assert out["pruned"]["weights_mb"] < out["dense"]["weights_mb"]
    with pytest.raises(ConfigError, match="prompt_len"):
        measure(dense, prompt_len=0)
