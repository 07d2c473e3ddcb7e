"""`schedule: search` on tiny models: the budget is met exactly (parameters, or the serving-memory formula),
every constraint holds, infeasible budgets are one-line ConfigErrors, and SlimGPT applies the searched widths."""

from __future__ import annotations

import pytest
import torch

from pruning_core import search, search_tables
from pruning_core.adapters import adapter_for
from pruning_core.errors import ConfigError
from pruning_core.methods import get_method
from pruning_core.models import tiny_model
from pruning_core.select import unit_counts
from pruning_core.surgery import apply_plan, count_params


def _model(seed=0, layers=4):
    torch.manual_seed(seed)
    return tiny_model("llama", n_layers=layers, hidden_size=96, intermediate_size=128, num_attention_heads=6,
                      num_key_value_heads=2)


@pytest.fixture(scope="module")
def setup():
    m = _model()
    a = adapter_for(m)
    ids = torch.randint(0, m.config.vocab_size, (6, 32), generator=torch.Generator().manual_seed(1))
    return m, a, ids, {g: search_tables.build_tables(m, a, ids, g) for g in ("per_group", "kv_group")}


def _decoder_total(m, a, gqa):
    return sum(u["total"] for u in unit_counts(m, a, gqa) if u)


def _ch(m, a):
    return next(u for u in unit_counts(m, a, "per_group") if u)["ch_params"]


def _check_shapes(s, m, a, st: search.SearchSettings, gqa):
    shape = a.layer_shape(m, a.layers(m)[0])
    for i, (q, f) in enumerate(zip(s["kept_q"], s["kept_ffn"])):
        assert (q == 0 and i in s["drop_attn"]) or (q >= st.min_heads and q % st.head_multiple == 0)
        assert (f == 0 and i in s["drop_ffn"]) or (f >= st.min_ffn and f % st.ffn_multiple == 0)
        assert f == shape.ffn - s["ffn"][i]


@pytest.mark.parametrize("sensitivity", ["residual", "kl"])
def test_tables_are_monotone_and_end_at_the_whole_block(setup, sensitivity):
    m, a, ids, tabs = setup
    t = tabs["per_group"] if sensitivity == "residual" else search_tables.build_tables(
        m, a, ids, "per_group", settings=search.SearchSettings(sensitivity="kl", kl_blocks=2))
    for i in range(4):
        assert t[f"ffn.{i}"].shape == (129,) and t[f"attn.{i}"].shape == (4,)  # 0..3 heads per group removed
        for k in ("ffn", "attn"):
            assert t[f"{k}.{i}"][0] == 0 and bool((t[f"{k}.{i}"].diff() >= 0).all())
    assert bool((t["scale"] > 0).all())


def test_auto_sensitivity_is_residual_for_obs_curves_and_kl_for_zeroing_curves(setup):
    m, a, ids, tabs = setup
    auto, kl = search.SearchSettings(kl_blocks=2), search.SearchSettings(sensitivity="kl", kl_blocks=2)
    assert search.resolved_sensitivity(auto, True) == "residual" and search.resolved_sensitivity(auto, False) == "kl"
    res = search_tables.build_tables(m, a, ids, "per_group", settings=search.SearchSettings(sensitivity="residual"))
    z_auto = search_tables.build_tables(m, a, ids, "per_group", compensate=False, settings=auto)
    z_kl = search_tables.build_tables(m, a, ids, "per_group", compensate=False, settings=kl)
    for k in tabs["per_group"]:
        if k != "seconds":
            assert torch.equal(tabs["per_group"][k], res[k]), k  # the default (auto, OBS) is residual
            assert torch.equal(z_auto[k], z_kl[k]), k  # zeroing curves: kl
    assert not torch.equal(z_auto["scale"], search_tables.build_tables(
        m, a, ids, "per_group", compensate=False, settings=search.SearchSettings(sensitivity="residual"))["scale"])


@pytest.mark.parametrize("gqa", ["per_group", "kv_group"])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_parameter_budget_met_to_one_channel(setup, gqa, ratio):
    m, a, ids, tabs = setup
    s = search.solve(m, a, tabs[gqa], ratio, gqa)
    total = _decoder_total(m, a, gqa)
    assert abs(s["realised"] * total - ratio * total) <= _ch(m, a) / 2
    assert s["params_after"] == count_params(m) - round(s["realised"] * total)


def test_constraints_hold(setup):
    m, a, ids, tabs = setup
    st = search.SearchSettings(ffn_multiple=8, min_ffn=40, head_multiple=2, min_heads=4)
    s = search.solve(m, a, tabs["per_group"], 0.35, "per_group", st)
    _check_shapes(s, m, a, st, "per_group")
    total = _decoder_total(m, a, "per_group")
    assert abs(s["realised"] - 0.35) * total <= 8 * _ch(m, a) / 2  # one multiple
    v = search.solve(m, a, tabs["per_group"], 0.35, "per_group", st, servable="vllm")
    assert len(set(v["kept_q"])) == 1
    _check_shapes(v, m, a, st, "per_group")


def test_drop_blocks_gives_attention_or_ffn_free_layers(setup):
    m, a, ids, tabs = setup
    st = search.SearchSettings(drop_blocks=True)
    s = search.solve(m, a, tabs["kv_group"], 0.75, "kv_group", st)
    _check_shapes(s, m, a, st, "kv_group")
    assert s["drop_attn"] or s["drop_ffn"]  # 75 % cannot be reached by width alone here
    total = _decoder_total(m, a, "kv_group")
    assert abs(s["realised"] - 0.75) * total <= _ch(m, a) / 2
    with pytest.raises(ConfigError, match="drop_blocks False"):
        search.solve(m, a, tabs["kv_group"], 0.75, "kv_group")


def test_memory_budget_fits_to_one_channel(setup):
    m, a, ids, tabs = setup
    dense = count_params(m) * 2 + 2 * 2 * 64 * 4 * 2 * 16 * 2  # params x 2 B + K,V x batch 2 x 64 tok x 4 layers x 2 kv x 16 x 2 B
    for gqa in ("per_group", "kv_group"):
        b = search.Budget(memory_mb=0.8 * dense / 2**20, seq_len=64, batch=2)
        s = search.solve(m, a, tabs[gqa], None, gqa, budget=b)
        assert search.serving_bytes(s["params_after"], s["kept_kv"], 16, b) == s["memory_bytes"]
        assert 0 <= b.memory_mb * 2**20 - s["memory_bytes"] < 2 * _ch(m, a)  # fits, within one channel's bytes
    # the KV cache counts: at a long context a kv_group search removes KV groups
    b = search.Budget(memory_mb=0.6 * (count_params(m) * 2 + 2 * 8192 * 4 * 2 * 16 * 2) / 2**20, seq_len=8192)
    s = search.solve(m, a, tabs["kv_group"], None, "kv_group", budget=b)
    assert sum(s["kept_kv"]) < 8 and s["memory_bytes"] <= b.memory_mb * 2**20


def test_infeasible_budgets_are_one_line_config_errors(setup):
    m, a, ids, tabs = setup
    with pytest.raises(ConfigError) as e:
        search.solve(m, a, tabs["per_group"], 0.9, "per_group", search.SearchSettings(min_ffn=100))
    assert str(e.value).startswith("ratio: got 0.9; accepted: a ratio <= ") and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^budget.memory_mb: got .*memory_mb >= "):
        search.solve(m, a, tabs["per_group"], None, "per_group", budget=search.Budget(memory_mb=0.01))
    with pytest.raises(ConfigError, match="^search.ffn_multiple"):
        search.parse_search({"ffn_multiple": 0})
    with pytest.raises(ConfigError, match="^search.grd: got 'grd'; accepted: one of drop_blocks"):
        search.parse_search({"grd": 3})
    with pytest.raises(ConfigError, match="^budget.memory_mb"):
        search.parse_budget({"memory_mb": -1})
    with pytest.raises(ConfigError, match="^budget.seq_length"):
        search.parse_budget({"memory_mb": 1, "seq_length": 3})


def test_slimgpt_applies_the_searched_widths(setup):
    m0, a, ids, tabs = setup
    meth = get_method("slimgpt")
    st = meth.parse_settings({"schedule": "search", "search": {"ffn_multiple": 4}})
    m = _model()
    plan = meth.prune(m, a, ids, 0.3, st, tables=tabs["per_group"])
    s = search.solve(m0, a, tabs["per_group"], 0.3, "per_group", st.search)
    assert plan.notes["search"]["tables_reused"] and plan.notes["search"]["kept_ffn"] == s["kept_ffn"]
    apply_plan(m, plan)
    assert count_params(m) == s["params_after"] == plan.params_after
    assert [len(lp.ffn) if lp.ffn is not None else 128 for lp in plan.layers] == s["kept_ffn"]


def test_flap_and_score_then_select_methods_take_the_searched_counts(setup):
    m0, a, ids, tabs = setup
    zero = search_tables.build_tables(m0, a, ids, "kv_group", compensate=False)
    flap = get_method("flap")
    st = flap.parse_settings({"schedule": "search"})
    m = _model()
    plan = flap.prune(m, a, ids, 0.3, st, tables=zero)
    s = search.solve(m0, a, zero, 0.3, "kv_group")
    assert plan.notes["search"]["kept_ffn"] == s["kept_ffn"]
    apply_plan(m, plan)
    assert plan.params_after == count_params(m)
    with pytest.raises(ConfigError, match="^method.settings.schedule"):
        flap.prune(_model(), a, ids, 0.3, flap.parse_settings({"schedule": "search", "structure": "al_am"}))
    for name, gqa in (("wanda", "kv_group"), ("l2", "per_group")):
        meth = get_method(name)
        st = meth.parse_settings({"schedule": "search", "gqa": gqa, "search": {"ffn_multiple": 8}})
        from pruning_core.capture import capture_stats

        stats = capture_stats(m0, a, ids, requests=meth.needs) if meth.needs else {}
        scores = meth.score(m0, a, stats, st)
        with pytest.raises(ConfigError, match="^schedule: got 'search'"):
            meth.select(m0, a, scores, 0.3, st)
        plan = search.select_searched(m0, a, scores, 0.3, st, name, search_tables.build_tables(m0, a, ids, gqa, compensate=False))
        assert all(len(lp.ffn or range(128)) % 8 == 0 for lp in plan.layers)
        total = _decoder_total(m0, a, gqa)
        assert abs((plan.params_before - plan.params_after) - 0.3 * total) <= 8 * _ch(m0, a) / 2
        m = _model()
        apply_plan(m, plan)
        assert count_params(m) == plan.params_after
    # LLM-Rank (FFN channels only): the searched FFN widths, PageRank's channels in them, no head removed
    meth = get_method("llm-rank")
    st = meth.parse_settings({"schedule": "search", "search": {"ffn_multiple": 8}})
    from pruning_core.capture import capture_stats

    scores = meth.score(m0, a, capture_stats(m0, a, ids), st)
    with pytest.raises(ConfigError, match="^schedule: got 'search'"):
        meth.select(m0, a, scores, 0.2, st)
    tables = search_tables.build_tables(m0, a, ids, "per_group", compensate=False)
    plan = search.select_searched(m0, a, scores, 0.2, st, "llm-rank", tables)
    assert all(lp.heads is None and lp.kv_heads is None for lp in plan.layers)
    full = [s.ffn for s in a.shapes(m0)]
    kept = [full[i] if lp.ffn is None else len(lp.ffn) for i, lp in enumerate(plan.layers)]
    assert all(k % 8 == 0 for k in kept) and len(set(kept)) > 1  # widths differ by layer
    assert plan.notes["search"]["kept_ffn"] == kept
    for i, lp in enumerate(plan.layers):  # within a layer: the highest-ranked channels
        if lp.ffn is not None:
            top = torch.argsort(scores[f"ffn.{i}"].double(), descending=True, stable=True)[: len(lp.ffn)]
            assert sorted(top.tolist()) == lp.ffn
    m = _model()
    apply_plan(m, plan)
    assert count_params(m) == plan.params_after
    with pytest.raises(ConfigError, match="allocation: local with schedule: search"):
        meth.parse_settings({"schedule": "search", "allocation": "global"})


def test_report_plots_the_searched_widths_against_the_profile(setup, tmp_path):
    from pruning_core.report import render_markdown

    m0, a, ids, tabs = setup
    meth = get_method("slimgpt")
    plan = meth.prune(_model(), a, ids, 0.3, meth.parse_settings({"schedule": "search"}), tables=tabs["per_group"])
    notes = plan.notes["search"]
    assert notes["profile"]["name"] == "log_increase" and len(notes["profile"]["ratios"]) == 4
    md = render_markdown({"model": "tiny", "method": "slimgpt", "plan_notes": {"search": notes},
                          "cache": {"layer_tables": "hit"}}, tmp_path / "plots")
    assert "## Searched widths" in md and "reused (cache hit)" in md and "candidates scored by the model: 0" in md
    assert (tmp_path / "plots" / "searched_widths.png").stat().st_size > 0
