"""LLM-Rank: the weighted PageRank on hand-built graphs, and the method on tiny decoders."""

from __future__ import annotations

import pytest
import torch

from pruning_core.errors import ConfigError, DataError
from pruning_core.methods import get_method
from pruning_core.methods import llm_rank as lr

F64 = torch.float64


def t(*rows):
    return torch.tensor(rows, dtype=F64)


# ------------------------------------------------------------------------------------------------
# hand-computed graphs
# ------------------------------------------------------------------------------------------------
# W = [[1, 3], [2, 0]] (2 outputs x 2 inputs), prior p0 = [1/2, 1/2], a_out = [1, 3] -> beta = [1/4, 3/4]
# c = [3, 3], d = [2, 1]
# (W/c) p0 = [(1/3 + 1)/2, (2/3)/2] = [2/3, 1/3]
# (A/d) p0 = [(1/2 + 1)/2, (1/2)/2] = [3/4, 1/4]
W1 = t([1.0, 3.0], [2.0, 0.0])
P0 = t(1.0, 1.0)
A1 = t(1.0, 3.0)


@pytest.mark.parametrize(
    "gamma,theta,expected",
    [
        # 0.5 * (0.5*[2/3,1/3] + 0.5*[3/4,1/4]) + 0.5*[1/4,3/4] = [23/48, 25/48]
        (0.5, 0.5, [23 / 48, 25 / 48]),
        # 0.5 * [2/3, 1/3] + 0.5 * [1/4, 3/4] = [11/24, 13/24]
        (0.5, 1.0, [11 / 24, 13 / 24]),
        # 0.5 * [3/4, 1/4] + 0.5 * [1/4, 3/4] = [1/2, 1/2]
        (0.5, 0.0, [0.5, 0.5]),
        # gamma = 1: pure propagation, theta = 0.5: [17/24, 7/24]
        (1.0, 0.5, [17 / 24, 7 / 24]),
    ],
)
def test_one_layer_by_hand(gamma, theta, expected):
    p = lr.wpr_layer(W1, P0, A1, gamma, theta)
    assert torch.allclose(p, t(*expected), atol=1e-12)
    assert abs(float(p.sum()) - 1) < 1e-12


def test_two_layer_chain_by_hand():
    # layer 2: W2 = [[1, 0], [1, 1]], a_out = [1, 1]; prior = p1 = [23/48, 25/48] (gamma .5, theta .5)
    # c = [2, 1], d = [2, 1]: W/c = A/d = [[1/2, 0], [1/2, 1]] -> M p1 = [23/96, 23/96 + 25/48] = [23/96, 73/96]
    # p2 = 0.5 * [23/96, 73/96] + 0.5 * [1/2, 1/2] = [71/192, 121/192]
    W2 = t([1.0, 0.0], [1.0, 1.0])
    ps = lr.wpr_chain([W1, W2], P0, [A1, t(1.0, 1.0)], gamma=0.5, theta=0.5)
    assert torch.allclose(ps[0], t(23 / 48, 25 / 48), atol=1e-12)
    assert torch.allclose(ps[1], t(71 / 192, 121 / 192), atol=1e-12)


def test_gamma_zero_is_activation_norm():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 5, generator=g, dtype=F64)
    a = torch.rand(7, generator=g, dtype=F64) + 0.1
    for theta in (0.0, 0.3, 1.0):
        p = lr.wpr_layer(w, torch.rand(5, generator=g, dtype=F64), a, gamma=0.0, theta=theta)
        assert torch.allclose(p, a / a.sum(), atol=1e-15)


def test_theta_degree_term_is_constant_on_a_dense_layer():
    """On a dense layer A (p/d) = sum(p)/n_out for every node: theta only moves weight between the
    propagated term and the teleport, so (gamma, theta) ranks like (gamma', 1) with
    gamma' = gamma*theta / (gamma*theta + 1 - gamma); at gamma = 1 theta changes no ranking at all."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 9, generator=g, dtype=F64)
    prior, a = torch.rand(9, generator=g, dtype=F64), torch.rand(16, generator=g, dtype=F64)
    pure = [lr.wpr_layer(w, prior, a, 1.0, th) for th in (0.1, 0.5, 1.0)]
    assert not torch.allclose(pure[0], pure[2])  # the values move ...
    assert all(
        torch.equal(torch.argsort(pure[0]), torch.argsort(p)) for p in pure[1:]
    )  # ... the ranking does not
    gamma, theta = 0.9, 0.5
    g2 = gamma * theta / (gamma * theta + 1 - gamma)
    s, s2 = lr.wpr_layer(w, prior, a, gamma, theta), lr.wpr_layer(w, prior, a, g2, 1.0)
    assert torch.equal(torch.argsort(s), torch.argsort(s2))
    # exact: s = normalise(k * s2 + const) with k = gamma*theta + 1 - gamma, const = gamma*(1-theta)/n
    k = gamma * theta + 1 - gamma
    assert torch.allclose(s, lr.normalise(k * s2 + gamma * (1 - theta) / 16), atol=1e-12)


def test_theta_matters_once_a_layer_has_zero_weights():
    # W = [[0, 4, 4], [1, 1, 1]], p uniform (1/3 each), gamma = 1: c = [1, 5, 5], d = [1, 2, 2]
    # theta = 1: (W/c) p = [(4/5 + 4/5)/3, (1 + 1/5 + 1/5)/3] = [8/15, 7/15]   -> node 0 first
    # theta = 0: (A/d) p = [(1/2 + 1/2)/3, (1 + 1/2 + 1/2)/3] = [1/3, 2/3]    -> node 1 first
    w = t([0.0, 4.0, 4.0], [1.0, 1.0, 1.0])
    p, a = t(1.0, 1.0, 1.0), t(1.0, 1.0)
    assert torch.allclose(lr.wpr_layer(w, p, a, 1.0, 1.0), t(8 / 15, 7 / 15), atol=1e-12)
    assert torch.allclose(lr.wpr_layer(w, p, a, 1.0, 0.0), t(1 / 3, 2 / 3), atol=1e-12)


def test_chunked_transition_equals_dense_reference(monkeypatch):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(37, 11, generator=g, dtype=F64)
    w[w.abs() < 0.5] = 0  # a sparse layer: degrees differ per column
    w[:, 3] = 0  # a dead input column: 0/0 -> 0
    p = torch.rand(11, generator=g, dtype=F64)
    theta = 0.3
    wa, adj = w.abs(), (w != 0).to(F64)
    c, d = wa.sum(0), adj.sum(0)
    m = theta * torch.nan_to_num(wa / c) + (1 - theta) * torch.nan_to_num(adj / d)
    ref = m @ p
    monkeypatch.setattr(lr, "_CHUNK_ELEMS", 30)  # 2 rows per chunk
    assert torch.allclose(lr.transition(w, p, theta), ref, atol=1e-12)
    # columns of M sum to 1 where the input has out-edges
    assert torch.allclose(m.sum(0)[c > 0], torch.ones(10, dtype=F64))


def test_mpr_by_hand():
    # (|W| p) * a_out with p = [1/2, 1/2]: |W| p = [2, 1]; * [1, 3] = [2, 3] -> [2/5, 3/5]
    assert torch.allclose(lr.mpr_layer(W1, P0, A1), t(2 / 5, 3 / 5), atol=1e-12)


def test_global_allocation_corrects_the_width_bias():
    narrow = t(0.1, 0.2, 0.3, 0.4)  # n = 4, mean 1/4
    wide = t(0.120, 0.122, 0.124, 0.125, 0.126, 0.127, 0.128, 0.128)  # n = 8, mean 1/8
    keep = lr.keep_global([narrow, wide], 0.25)  # 3 of 12 removed
    # corrected: narrow*4 = [.4, .8, 1.2, 1.6]; wide*8 ~ [.96, ...]: removes narrow 0, 1 and wide 0.
    # (Uncorrected scores would remove narrow 0 and wide 0, 1.)
    assert keep == [[2, 3], [1, 2, 3, 4, 5, 6, 7]]


def test_global_allocation_keeps_one_unit_per_layer():
    keep = lr.keep_global([t(1e-9, 2e-9, 3e-9), t(1.0, 2.0, 3.0)], 0.6)  # 4 of 6 removed
    assert [len(k) for k in keep] == [1, 1]
    assert keep == [[2], [2]]


def test_local_keep_removes_round_n_r_lowest():
    s = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0])
    assert lr.keep_local(s, 0.4) == [0, 2, 4]


# ------------------------------------------------------------------------------------------------
# on tiny decoders
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from pruning_core.adapters import adapter_for
    from pruning_core.capture import capture_stats
    from pruning_core.models import tiny_model

    out = {}
    for fam in ("llama", "opt"):
        model = tiny_model(fam, n_layers=3)
        adapter = adapter_for(model)
        ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
        out[fam] = (model, adapter, capture_stats(model, adapter, ids, batch_size=2), ids)
    return out


def _settings(name, **kw):
    return get_method(name).parse_settings(kw)


def test_decoder_gamma_zero_is_up_activation_and_chained_equals_isolated(tiny):
    model, adapter, stats, _ = tiny["llama"]
    m = get_method("llm-rank")
    iso = m.score(model, adapter, stats, _settings("llm-rank", gamma=0.0, pipeline="isolated", node="up"))
    cha = m.score(model, adapter, stats, _settings("llm-rank", gamma=0.0, pipeline="chained", node="up"))
    for i in range(3):
        a = stats[f"layer.{i}.up_out_sq"].double().sqrt()
        assert torch.allclose(iso[f"ffn.{i}"].double(), a / a.sum(), atol=1e-6)
        assert torch.equal(iso[f"ffn.{i}"], cha[f"ffn.{i}"])
    down = m.score(model, adapter, stats, _settings("llm-rank", gamma=0.0, node="down_in"))
    a = stats["layer.1.mlp_in_sq"].double().sqrt()
    assert torch.allclose(down["ffn.1"].double(), a / a.sum(), atol=1e-6)


def test_decoder_chained_differs_from_isolated_when_gamma_positive(tiny):
    model, adapter, stats, _ = tiny["llama"]
    m = get_method("llm-rank")
    iso = m.score(model, adapter, stats, _settings("llm-rank", gamma=0.9, pipeline="isolated", node="up"))
    cha = m.score(model, adapter, stats, _settings("llm-rank", gamma=0.9, pipeline="chained", node="up"))
    assert torch.allclose(iso["ffn.0"], cha["ffn.0"])  # same prior in the first block
    assert not torch.allclose(iso["ffn.2"], cha["ffn.2"])
    # isolated layer i by hand from the layer's own weights and statistics
    layer = adapter.layers(model)[1]
    w = layer.mlp.up_proj.weight.detach().double()
    x = stats["layer.1.mlp_x_sq"].double().sqrt()
    a = stats["layer.1.up_out_sq"].double().sqrt()
    wa = w.abs()
    mp = 0.5 * (wa / wa.sum(0)) @ (x / x.sum()) + 0.5 / w.shape[0]
    ref = 0.9 * mp + 0.1 * a / a.sum()
    assert torch.allclose(iso["ffn.1"].double(), ref / ref.sum(), atol=1e-6)


@pytest.mark.parametrize("fam", ["llama", "opt"])
@pytest.mark.parametrize("name,allocation", [("llm-rank", "local"), ("llm-rank", "global"), ("mpr", "local")])
def test_pruned_decoder_is_smaller_and_reloads(tiny, tmp_path, fam, name, allocation):
    import copy

    from pruning_core.checkpoint import load_pruned, save_pruned
    from pruning_core.surgery import apply_plan, count_params

    model, adapter, stats, ids = tiny[fam]
    model = copy.deepcopy(model)
    m = get_method(name)
    st = _settings(name, allocation=allocation)
    plan = m.select(model, adapter, m.score(model, adapter, stats, st), 0.25, st)
    d_ff = adapter.layer_shape(model, adapter.layers(model)[0]).ffn
    kept = [len(lp.ffn) for lp in plan.layers]
    # ratio = fraction of decoder-layer parameters: the channels holding 25 % of each layer's parameters
    layer = sum(p.numel() for p in adapter.layers(model)[0].parameters())
    ch = (len(adapter.mlp_in) + 1) * adapter.proj(adapter.layers(model)[0], adapter.o).out_features  # weights/channel
    half_up = lambda x: int(x + 0.5)  # noqa: E731 - the selection's rounding (not Python's round-half-even)
    if allocation == "local":
        assert kept == [d_ff - half_up(0.25 * layer / ch)] * 3
    else:
        assert sum(kept) == 3 * d_ff - half_up(3 * 0.25 * layer / ch)
    before = count_params(model)
    apply_plan(model, plan)
    assert count_params(model) == plan.params_after < before == plan.params_before
    assert [adapter.layer_shape(model, la).ffn for la in adapter.layers(model)] == kept
    with torch.no_grad():
        logits = model(ids).logits
        save_pruned(model, None, plan, tmp_path / "ck")
        again, _ = load_pruned(tmp_path / "ck")
        assert torch.equal(again(ids).logits, logits)


def test_removing_dead_channels_keeps_logits(tiny):
    """Zero the down columns of the channels the plan removes: physically removing them must then
    leave the logits unchanged (the plan's indices are the ones surgery removes)."""
    import copy

    from pruning_core.surgery import apply_plan

    model, adapter, stats, ids = tiny["llama"]
    model = copy.deepcopy(model)
    m = get_method("llm-rank")
    st = _settings("llm-rank")
    plan = m.select(model, adapter, m.score(model, adapter, stats, st), 0.5, st)
    with torch.no_grad():
        for lp, layer in zip(plan.layers, adapter.layers(model)):
            drop = sorted(set(range(layer.mlp.down_proj.in_features)) - set(lp.ffn))
            layer.mlp.down_proj.weight[:, drop] = 0
        ref = model(ids).logits
        apply_plan(model, plan)
        assert torch.allclose(model(ids).logits, ref, atol=1e-5)


def test_bad_settings_and_inputs(tiny):
    model, adapter, stats, _ = tiny["llama"]
    m = get_method("llm-rank")
    with pytest.raises(ConfigError, match="gamma"):
        m.parse_settings({"gamma": 1.5})
    with pytest.raises(ConfigError, match="pipeline"):
        m.parse_settings({"pipeline": "stacked"})
    with pytest.raises(ConfigError, match="gama"):
        m.parse_settings({"gama": 0.5})
    st = m.parse_settings({})
    with pytest.raises(ConfigError, match="ratio"):
        m.select(model, adapter, m.score(model, adapter, stats, st), 1.0, st)
    partial = {k: v for k, v in stats.items() if k != "layer.1.mlp_out_sq"}
    with pytest.raises(DataError, match="mlp_out_sq"):  # the chained pipeline needs the FFN outputs
        m.score(model, adapter, partial, m.parse_settings({"pipeline": "chained"}))
    stale = dict(stats, **{"layer.0.mlp_in_sq": stats["layer.0.mlp_in_sq"][:-1]})  # captured on another shape
    with pytest.raises(DataError, match="stats"):
        m.score(model, adapter, stale, st)


@pytest.mark.slow
def test_smollm2_pruned_is_smaller_and_reloads(tmp_path):
    from pruning_core.adapters import adapter_for
    from pruning_core.capture import capture_stats
    from pruning_core.checkpoint import load_pruned, save_pruned
    from pruning_core.data import calibration_set
    from pruning_core.models import load_model
    from pruning_core.surgery import apply_plan, count_params

    try:
        model, tok = load_model("smollm2-135m", device="cpu")
    except DataError as e:  # the embedded model is not installed here
        pytest.skip(str(e))
    adapter = adapter_for(model)
    calib = calibration_set(tok, n_samples=4, seq_len=64, seed=0)
    stats = capture_stats(model, adapter, calib, batch_size=4)
    m = get_method("llm-rank")
    st = m.parse_settings({"gamma": 0.9, "pipeline": "chained"})
    plan = m.select(model, adapter, m.score(model, adapter, stats, st), 0.2, st)
    before = count_params(model)
    apply_plan(model, plan)
    assert count_params(model) == plan.params_after < before
    # 20 % of a layer's 3,540,096 parameters in FFN channels of 3 x 576: round(409.7) = 410 channels
    assert model.config.intermediate_size == 1536 - 410
    assert all(la.mlp.gate_proj.out_features == 1126 for la in adapter.layers(model))
    x = calib[:1, :16]
    with torch.no_grad():
        logits = model(input_ids=x).logits
        save_pruned(model, tok, plan, tmp_path / "ck")
        again, _ = load_pruned(tmp_path / "ck")
        assert torch.equal(again(input_ids=x).logits, logits)
