"""`search.drop_blocks`: whole attention / FFN sub-blocks removed (joint depth and width). A layer whose
removed sub-block had a zero output gives exactly the same logits after surgery; the plan's parameter
count is the model's; the checkpoint round-trips and exports as DeciLM no-op blocks; SlimGPT and the
score-then-select methods apply a searched plan with whole blocks, FLAP refuses it in one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pruning_core import search, search_tables
from pruning_core.adapters import adapter_for
from pruning_core.capture import capture_stats
from pruning_core.checkpoint import load_pruned, save_pruned
from pruning_core.errors import ConfigError
from pruning_core.export import export_checkpoint
from pruning_core.methods import get_method
from pruning_core.metrics import plan_params
from pruning_core.models import tiny_model
from pruning_core.surgery import apply_plan, count_params
from tests.serve_kinds import PROMPTS, plans, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(m, ids):
    with torch.no_grad():
        return m(input_ids=ids, use_cache=False).logits


def test_zero_output_sub_blocks_are_removed_exactly_and_round_trip(tmp_path):
    m = tiny_llama(3)
    plan = plans()["whole_blocks"]  # layer 1 attention-free, layer 2 FFN-free, layer 3 both (removed)
    layers = m.model.layers
    with torch.no_grad():
        for lin in (layers[1].self_attn.o_proj, layers[2].mlp.down_proj, layers[3].self_attn.o_proj,
                    layers[3].mlp.down_proj):
            lin.weight.zero_()
        for j in range(256):  # layer 0 / 1's dropped FFN channels: zero their down_proj columns too
            for i in (0, 1):
                if j not in plan.layers[i].ffn:
                    layers[i].mlp.down_proj.weight[:, j] = 0
    ids = torch.tensor([PROMPTS[1]])
    ref = _logits(m, ids)
    before, after = plan_params(m, plan)
    apply_plan(m, plan)
    got = _logits(m, ids)
    assert torch.allclose(got, ref, atol=1e-5, rtol=0)  # FFN channels: another summation order; whole blocks: exact
    assert count_params(m) == after < before
    kinds = [getattr(la, "pruneflow_kind", "decoder") for la in m.model.layers]
    assert kinds == ["decoder", "ffn", "decoder"] and m.model.layers[2].mlp.down_proj.in_features == 0
    out = save_pruned(m, None, plan, tmp_path / "ckpt")
    desc = json.loads((out / "config.json").read_text())["pruneflow_layers"]
    assert [(d["kind"], d["ffn"]) for d in desc] == [("decoder", 192), ("ffn", 160), ("decoder", 0)]
    back, _ = load_pruned(out)
    assert torch.equal(_logits(back, ids), got) and count_params(back) == after
    # vLLM's DeciLM: an attention-no-op and an FFN-no-op block (without the zero-width MLP and its norm),
    # the removed layer a no-op block, so block i is input layer i
    res = export_checkpoint(out, tmp_path / "vllm")
    assert res["layout"] == "decilm"
    cfg = json.loads((tmp_path / "vllm" / "config.json").read_text())
    blocks = [(b["attention"]["no_op"], b["ffn"]["no_op"], b["ffn"]["intermediate_size"]) for b in cfg["block_configs"]]
    assert blocks == [(False, False, 192), (True, False, 160), (False, True, None), (True, True, None)]
    names = load_file(str(tmp_path / "vllm" / "model.safetensors")).keys()
    assert not [k for k in names if k.startswith("model.layers.2.") and ("mlp." in k or "post_attention" in k)]
    assert "model.layers.2.self_attn.o_proj.weight" in names and not [k for k in names if ".layers.3." in k]


def test_whole_blocks_alone_change_no_logit_bit():
    from pruning_core.plan import LayerPlan, PrunePlan

    m = tiny_llama(4)
    layers = m.model.layers
    with torch.no_grad():
        for lin in (layers[1].self_attn.o_proj, layers[2].mlp.down_proj, layers[3].self_attn.o_proj,
                    layers[3].mlp.down_proj):
            lin.weight.zero_()
    ids = torch.tensor(PROMPTS[:1])
    ref = _logits(m, ids)
    apply_plan(m, PrunePlan(method="hand", settings={}, layers=[
        LayerPlan(0), LayerPlan(1, heads=[], kv_heads=[]), LayerPlan(2, ffn=[]), LayerPlan(3, keep=False)]))
    assert len(m.model.layers) == 3 and torch.equal(_logits(m, ids), ref)


def test_a_plan_that_keeps_neither_sub_block_must_remove_the_layer():
    from pruning_core.plan import LayerPlan, PrunePlan

    m = tiny_llama(0)
    bad = PrunePlan(method="hand", settings={}, layers=[LayerPlan(0), LayerPlan(1, heads=[], kv_heads=[], ffn=[]),
                                                        LayerPlan(2), LayerPlan(3)])
    with pytest.raises(ConfigError, match=r"^plan.layers\[1\]: .*keep: false"):
        apply_plan(m, bad)


def _model(seed=0):
    torch.manual_seed(seed)
    return tiny_model("llama", n_layers=4, hidden_size=96, intermediate_size=128, num_attention_heads=6,
                      num_key_value_heads=2)


IDS = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("gqa", ["kv_group", "per_group"])
def test_slimgpt_applies_a_searched_plan_with_whole_blocks(gqa):
    m0 = _model()
    a = adapter_for(m0)
    tables = search_tables.build_tables(m0, a, IDS, gqa)
    meth = get_method("slimgpt")
    st = meth.parse_settings({"schedule": "search", "gqa": gqa, "search": {"drop_blocks": True}})
    sched = search.solve(m0, a, tables, 0.75, gqa, st.search)
    assert sched["drop_attn"] or sched["drop_ffn"]  # 75 % is out of reach of width alone here
    m = _model()
    plan = meth.prune(m, a, IDS, 0.75, st, tables=tables)
    for i, lp in enumerate(plan.layers):
        assert (lp.heads == [] and lp.kv_heads == []) == (i in sched["drop_attn"] and lp.keep)
        assert (lp.ffn == []) == (i in sched["drop_ffn"] and lp.keep)
        assert lp.keep == (i not in set(sched["drop_attn"]) & set(sched["drop_ffn"]))
    ref = _logits(m, IDS[:2])  # in place: removed structures zeroed, kept weights OBS-updated
    apply_plan(m, plan)
    assert torch.allclose(_logits(m, IDS[:2]), ref, atol=1e-5, rtol=0)
    assert count_params(m) == plan.params_after == sched["params_after"]
    total = sum(sum(p.numel() for p in la.parameters()) for la in a.layers(m0))
    assert abs((plan.params_before - plan.params_after) - 0.75 * total) <= 3 * 96 / 2  # one FFN channel


def test_score_then_select_methods_keep_no_unit_of_a_dropped_block_and_flap_refuses():
    m0 = _model()
    a = adapter_for(m0)
    tables = search_tables.build_tables(m0, a, IDS, "kv_group", compensate=False)
    meth = get_method("wanda")
    st = meth.parse_settings({"schedule": "search", "gqa": "kv_group", "search": {"drop_blocks": True}})
    scores = meth.score(m0, a, capture_stats(m0, a, IDS, requests=meth.needs), st)
    plan = search.select_searched(m0, a, scores, 0.75, st, "wanda", tables)
    sched = plan.notes["search"]
    assert sched["drop_attn"] or sched["drop_ffn"]
    for i, lp in enumerate(plan.layers):
        if lp.keep and i in sched["drop_attn"]:
            assert lp.heads == [] and lp.kv_heads == [] and len(lp.ffn or range(128)) == sched["kept_ffn"][i]
        if lp.keep and i in sched["drop_ffn"]:
            assert lp.ffn == [] and len(lp.kv_heads or range(2)) == sched["kept_kv"][i]
    m = _model()
    apply_plan(m, plan)
    assert count_params(m) == plan.params_after == sched["params_after"]
    with pytest.raises(ConfigError, match="^search.drop_blocks: got True; accepted: false for flap"):
        get_method("flap").parse_settings({"schedule": "search", "search": {"drop_blocks": True}})


def test_servable_vllm_keeps_the_first_layers_attention_and_one_head_count():
    m0 = _model()
    a = adapter_for(m0)
    tables = search_tables.build_tables(m0, a, IDS, "kv_group")
    st = search.SearchSettings(drop_blocks=True)
    s = search.solve(m0, a, tables, 0.75, "kv_group", st, servable="vllm")
    assert 0 not in s["drop_attn"]
    assert len({q for i, q in enumerate(s["kept_q"]) if i not in s["drop_attn"]}) == 1
