"""Removing structures whose weights were zeroed leaves the function unchanged; save -> load is exact."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from pruning_core import (
    ConfigError,
    LayerPlan,
    PrunePlan,
    StorageError,
    adapter_for,
    apply_plan,
    count_params,
    load_pruned,
    plan_params,
    save_pruned,
    tiny_model,
)
from pruning_core.surgery import sync_config

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(m, ids=IDS):
    with torch.no_grad():
        return m(input_ids=ids, use_cache=False).logits


def zero_heads(model, layer, heads):
    a = adapter_for(model)
    hd = a.head_dim(model)
    o = a.proj(a.layers(model)[layer], a.o)
    with torch.no_grad():
        for h in heads:
            o.weight[:, h * hd:(h + 1) * hd] = 0


def zero_ffn(model, layer, chans):
    a = adapter_for(model)
    with torch.no_grad():
        a.proj(a.layers(model)[layer], a.mlp_out).weight[:, chans] = 0


def make_identity(model, layer):
    a = adapter_for(model)
    lay = a.layers(model)[layer]
    with torch.no_grad():
        for name in (a.o, a.mlp_out):
            lin = a.proj(lay, name)
            lin.weight.zero_()
            if lin.bias is not None:
                lin.bias.zero_()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_zeroed_structures_removed_exactly(family):
    m = tiny_model(family, n_layers=4)
    n_kv = 2 if family == "llama" else 4
    # llama: 4 q heads / 2 KV groups -> drop KV group 1 (q heads 2,3) in layer 0
    zero_heads(m, 0, [2, 3])
    zero_ffn(m, 1, [0, 5, 7, 30])
    make_identity(m, 2)
    ref = logits(m)
    plan = PrunePlan.identity(4)
    plan.layers[0].heads, plan.layers[0].kv_heads = [0, 1], ([0] if family == "llama" else [0, 1])
    if family == "opt":
        plan.layers[0].kv_heads = [0, 1]
    plan.layers[1].ffn = [i for i in range(96) if i not in (0, 5, 7, 30)]
    plan.layers[2] = LayerPlan(2, keep=False)
    before, after = plan_params(m, plan)
    apply_plan(m, plan)
    assert count_params(m) == after < before
    a = adapter_for(m)
    assert len(a.layers(m)) == 3 and m.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in a.layers(m)] == [0, 1, 2]
    s0 = a.layer_shape(m, a.layers(m)[0])
    assert s0.n_heads == 2 and s0.n_kv_heads == (1 if family == "llama" else 2) and n_kv
    torch.testing.assert_close(logits(m), ref, atol=1e-5, rtol=1e-5)


def test_gqa_per_group_heads_removed_exactly():
    m = tiny_model("llama", n_layers=2)
    zero_heads(m, 1, [1, 3])  # one query head in each KV group
    ref = logits(m)
    plan = PrunePlan.identity(2)
    plan.layers[1].heads = [0, 2]
    apply_plan(m, plan)
    attn = adapter_for(m).layers(m)[1].self_attn
    assert attn.num_key_value_groups == 1 and attn.k_proj.out_features == 2 * 16
    torch.testing.assert_close(logits(m), ref, atol=1e-5, rtol=1e-5)


def test_unequal_query_heads_per_group_rejected():
    m = tiny_model("llama", n_layers=1)
    plan = PrunePlan.identity(1)
    plan.layers[0].heads = [0, 1, 2]
    with pytest.raises(ConfigError, match="same number of query heads"):
        apply_plan(m, plan)


def test_generate_with_cache_after_layer_removal():
    m = tiny_model("llama", n_layers=4)
    plan = PrunePlan.identity(4)
    plan.layers[1].keep = False
    plan.layers[3].keep = False
    apply_plan(m, plan)
    out = m.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False, use_cache=True)
    out_nc = m.generate(IDS[:1, :5], max_new_tokens=6, do_sample=False, use_cache=False)
    assert out.shape == (1, 11) and torch.equal(out, out_nc)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_uniform_save_loads_with_stock_from_pretrained(tmp_path, family):
    m = tiny_model(family, n_layers=3)
    plan = PrunePlan.identity(3)
    for lp in plan.layers:
        lp.ffn = list(range(0, 96, 2))
        if family == "llama":
            lp.heads, lp.kv_heads = [0, 1], [0]
    plan.layers[1].keep = False
    apply_plan(m, plan)
    ref = logits(m)
    path = save_pruned(m, None, plan, tmp_path / "ck")
    assert (path / "plan.json").exists() and not list(tmp_path.glob(".ck*"))
    stock = AutoModelForCausalLM.from_pretrained(path).eval()
    torch.testing.assert_close(logits(stock), ref, atol=0, rtol=0)
    assert PrunePlan.load(path / "plan.json").layers[1].keep is False


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_non_uniform_save_load_roundtrip(tmp_path, family):
    m = tiny_model(family, n_layers=3)
    plan = PrunePlan.identity(3)
    plan.layers[0].heads, plan.layers[0].kv_heads = ([0, 1], [0]) if family == "llama" else ([0, 1], [0, 1])
    plan.layers[2].ffn = list(range(40))
    apply_plan(m, plan)
    assert sync_config(m) is False
    ref = logits(m)
    path = save_pruned(m, None, plan, tmp_path / "ck")
    m2, tok = load_pruned(path)
    assert tok is None
    torch.testing.assert_close(logits(m2), ref, atol=0, rtol=0)
    assert count_params(m2) == count_params(m)


def test_save_is_atomic_and_replaces(tmp_path):
    m = tiny_model("llama", n_layers=1)
    p = save_pruned(m, None, None, tmp_path / "out")
    p2 = save_pruned(m, None, None, tmp_path / "out")
    assert p == p2 and sorted(x.name for x in tmp_path.iterdir()) == ["out"]


def test_unwritable_output(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    m = tiny_model("llama", n_layers=1)
    try:
        import os
        if os.geteuid() == 0:
            pytest.skip("root can write anywhere")
        with pytest.raises(StorageError, match="output"):
            save_pruned(m, None, None, ro / "x")
    finally:
        ro.chmod(0o700)


def test_output_under_a_file_is_rejected(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(StorageError, match="output"):
        save_pruned(tiny_model("llama", n_layers=1), None, None, f / "sub" / "ck")
