"""SlimGPT on tiny random Llamas (GQA 4 q / 2 kv heads) and the incremental pruning ratio."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pruning_core.adapters import adapter_for
from pruning_core.capture import capture_stats
from pruning_core.errors import ConfigError
from pruning_core.methods import get_method
from pruning_core.methods.slimgpt import SlimGPTSettings, prune
from pruning_core.models import tiny_model
from pruning_core.plan import LayerPlan, PrunePlan
from pruning_core.select import layer_ratios, schedule_ratios, solve_schedule
from pruning_core.surgery import apply_plan, count_params


def _model(n_layers=4, **kw):
    return tiny_model("llama", n_layers=n_layers, hidden_size=64, intermediate_size=128,
                      num_attention_heads=4, num_key_value_heads=2, **kw)


def _ids(n=8, t=32, seed=0):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(m, ids):
    return m(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("gqa", ["kv_group", "per_group"])
def test_pruned_model_equals_zero_masked_compensated_model(gqa):
    m = _model()
    ids = _ids()
    dense = _logits(m, ids)
    plan = prune(m, adapter_for(m), ids, 0.3, SlimGPTSettings(gqa=gqa, schedule="uniform", head_ratio_scale=1.0))
    masked = _logits(m, ids)
    assert not torch.allclose(masked, dense, atol=1e-3)  # something was pruned and compensated
    small = apply_plan(copy.deepcopy(m), plan)
    assert count_params(small) == plan.params_after < plan.params_before
    torch.testing.assert_close(_logits(small, ids), masked, atol=1e-5, rtol=1e-5)
    for lp in plan.layers:
        rep = 2
        if gqa == "per_group":
            assert lp.kv_heads == [0, 1] and len(lp.heads) in (2, 4)
            assert sum(h // rep == 0 for h in lp.heads) == sum(h // rep == 1 for h in lp.heads)
        else:
            assert lp.heads == [h for g in lp.kv_heads for h in (2 * g, 2 * g + 1)]


def _baseline_plan(model, ref: PrunePlan, scores: dict) -> PrunePlan:
    """The baseline's own choice with the same number of KV groups / channels as `ref`."""
    lps = []
    for i, lp in enumerate(ref.layers):
        new = LayerPlan(i)
        if lp.kv_heads is not None:
            g = scores[f"heads.{i}"].view(2, 2).sum(1)
            kv = sorted(torch.argsort(g, descending=True)[: len(lp.kv_heads)].tolist())
            new.kv_heads, new.heads = kv, [h for k in kv for h in (2 * k, 2 * k + 1)]
        if lp.ffn is not None:
            new.ffn = sorted(torch.argsort(scores[f"ffn.{i}"], descending=True)[: len(lp.ffn)].tolist())
        lps.append(new)
    return PrunePlan(method="baseline", settings={}, layers=lps)


def test_reconstruction_error_below_wanda_and_magnitude_with_the_same_mask_sizes():
    base = _model(seed=1)
    calib, held = _ids(16, 32, seed=0), _ids(8, 32, seed=7)
    dense_c, dense_h = _logits(base, calib), _logits(base, held)

    def err(m):
        return [float((_logits(m, x) - d).norm() / d.norm()) for x, d in ((calib, dense_c), (held, dense_h))]

    slim = copy.deepcopy(base)
    plan = prune(slim, adapter_for(slim), calib, 0.25, SlimGPTSettings(schedule="uniform", gqa="kv_group"))
    e_slim = err(apply_plan(slim, plan))
    stats = capture_stats(base, adapter_for(base), calib)
    errs = {}
    for name in ("wanda", "l2"):
        meth = get_method(name)
        scores = meth.score(base, adapter_for(base), stats, meth.parse_settings({}))
        errs[name] = err(apply_plan(copy.deepcopy(base), _baseline_plan(base, plan, scores)))
    for name, e in errs.items():
        assert e_slim[0] < e[0], (name, e_slim, e)
        assert e_slim[1] < e[1], (name, e_slim, e)
    # and the per-layer relative calibration losses OBS reports are small
    assert all(v < 1 for loss in plan.notes["relative_layer_loss"] for v in loss.values())


def test_exact_and_naive_head_scores_and_ablations_run_and_compose():
    ids = _ids()
    for settings in (dict(head_score="exact"), dict(head_score="naive"), dict(compensate=False),
                     dict(dynamic_group_size=False), dict(stat_dtype="float64", percdamp=0.0)):
        m = _model()
        plan = prune(m, adapter_for(m), ids, 0.2, SlimGPTSettings(**settings))
        masked = _logits(m, ids)
        torch.testing.assert_close(_logits(apply_plan(m, plan), ids), masked, atol=1e-5, rtol=1e-5)


def test_settings_are_validated():
    meth = get_method("slimgpt")
    assert meth.coupled
    with pytest.raises(ConfigError, match="method.settings.percdmp"):
        meth.parse_settings({"percdmp": 0.1})
    with pytest.raises(ConfigError, match="schedule"):
        meth.parse_settings({"schedule": "cosine"})
    with pytest.raises(ConfigError, match="ratio"):
        prune(_model(), adapter_for(_model()), _ids(), 1.2)


def _smollm_shaped():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("schedule", ["log_increase", "uniform", "linear_decrease"])
@pytest.mark.parametrize("target", [0.1, 0.2, 0.3, 0.5])
def test_schedule_realises_the_target_after_rounding(schedule, target):
    m = _smollm_shaped()
    ad = adapter_for(m)
    sol = solve_schedule(m, ad, target, schedule)
    layer_params = sum(p.numel() for layer in ad.layers(m) for p in layer.parameters())
    one_channel = 3 * 576 / layer_params
    # to within one FFN channel; uniform keeps all layers the same shape: to within L/2 channels
    assert abs(sol["realised"] - target) <= one_channel * (15 if schedule == "uniform" else 1)
    if schedule == "uniform":
        assert len(set(sol["heads"])) == 1 and len(set(sol["ffn"])) == 1
    # and the realised count is what the kept structures add up to
    removed = sum(h * (3 * 2 * 64 * 576 + 2 * 64 * 576) + f * 3 * 576 for h, f in zip(sol["heads"], sol["ffn"]))
    assert abs(removed / layer_params - sol["realised"]) < 1e-12
    assert all(0 <= h <= 2 for h in sol["heads"]) and all(0 <= f < 1536 for f in sol["ffn"])


@pytest.mark.parametrize("target", [0.2, 0.5])
def test_head_ratio_scale_moves_the_budget_to_the_ffn(target):
    m = _smollm_shaped()
    ad = adapter_for(m)
    layer_params = sum(p.numel() for layer in ad.layers(m) for p in layer.parameters())
    one_channel = 3 * 576 / layer_params
    full = solve_schedule(m, ad, target, "log_increase", gqa="per_group")
    half = solve_schedule(m, ad, target, "log_increase", gqa="per_group", head_scale=0.5)
    none = solve_schedule(m, ad, target, "log_increase", gqa="per_group", head_scale=0.0)
    assert none["heads"] == [0] * 30 and sum(half["heads"]) < sum(full["heads"])
    for sol in (full, half, none):  # the budget holds whatever the split
        assert abs(sol["realised"] - target) <= one_channel
    assert sum(none["ffn"]) >= sum(half["ffn"]) > sum(full["ffn"])
    # per_group heads: (q rows + o columns) of one query head in each of the 3 KV groups
    removed = sum(h * 3 * 2 * 64 * 576 + f * 3 * 576 for h, f in zip(half["heads"], half["ffn"]))
    assert abs(removed / layer_params - half["realised"]) < 1e-12


def test_log_increase_uses_the_real_number_of_layers():
    L = 30
    r = schedule_ratios("log_increase", 0.4, L, 0.25)
    assert r[0] == pytest.approx(0.1) and r[-1] == pytest.approx(0.4)
    for i in range(L):
        assert r[i] == pytest.approx(0.1 + 0.3 * math.log(1 + i) / math.log(L))
    assert schedule_ratios("log_decrease", 0.4, L)[::-1] == pytest.approx(r)
    assert schedule_ratios("uniform", 0.4, L) == pytest.approx([0.4] * L)
    # the schedules registered for score-then-select methods have mean ratio = target
    for name in ("log_increase", "linear_increase", "log_decrease", "linear_decrease"):
        rs = layer_ratios(name, 0.2, L)
        assert sum(rs) / L == pytest.approx(0.2)
        assert (rs[-1] > rs[0]) == name.endswith("increase")


@pytest.mark.parametrize("inputs", ["dense", "pruned"])
def test_hessian_inputs_dense_sees_the_dense_activations_in_every_layer(inputs, monkeypatch):
    """`hessian_inputs="dense"`: every layer's o_proj Hessian is the dense model's (2/T)·XᵀX; with the
    paper's "pruned" inputs the layers after the first see the pruned layers' outputs instead."""
    from pruning_core import obs

    m = _model(n_layers=3)
    ids = _ids(8, 32)
    grams = {}

    def hook(i):
        def fn(mod, args, out):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[i] = grams.get(i, 0) + x.T @ x
        return fn

    hs = [layer.self_attn.o_proj.register_forward_hook(hook(i)) for i, layer in enumerate(m.model.layers)]
    _logits(m, ids)
    for h in hs:
        h.remove()
    expected = [g * 2.0 / ids.numel() for _, g in sorted(grams.items())]
    seen = []
    real = obs.prepare_hessian

    def record(H, W, percdamp):
        if W.shape[1] == 64:  # o_proj (the FFN's down_proj has 128 inputs)
            seen.append(H.double().clone())
        return real(H, W, percdamp)

    monkeypatch.setattr(obs, "prepare_hessian", record)
    prune(m, adapter_for(m), ids, 0.3, SlimGPTSettings(schedule="uniform", hessian_inputs=inputs))
    assert len(seen) == 3
    torch.testing.assert_close(seen[0], expected[0], rtol=1e-4, atol=1e-4)  # layer 0: the same inputs either way
    later = [torch.allclose(s, e, rtol=1e-4, atol=1e-4) for s, e in zip(seen[1:], expected[1:])]
    assert all(later) if inputs == "dense" else not any(later)
