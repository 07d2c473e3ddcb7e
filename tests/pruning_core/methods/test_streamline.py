"""LLM-Streamline and the ShortGPT baseline on tiny random models."""

from __future__ import annotations

import copy

import pytest
import torch

from pruning_core.adapters import adapter_for
from pruning_core.capture import capture_stats
from pruning_core.checkpoint import load_pruned, save_pruned
from pruning_core.errors import ConfigError
from pruning_core.methods import get_method
from pruning_core.methods.streamline import (
    ResidualFFN,
    StreamlineSettings,
    best_block,
    block_cosines,
    block_influence,
    block_io,
    lr_at,
    replacement_of,
    select,
    select_shortgpt,
    train_replacement,
)
from pruning_core.models import tiny_model
from pruning_core.surgery import apply_plan, count_params

torch.set_num_threads(1)


def _identity_model(n_layers=6, ident=(2, 3), seed=0):
    """Tiny Llama (GQA) whose layers `ident` are exact identity maps (o_proj and down_proj zero)."""
    model = tiny_model("llama", n_layers=n_layers, seed=seed)
    ad = adapter_for(model)
    with torch.no_grad():
        for i in ident:
            layer = ad.layers(model)[i]
            ad.proj(layer, ad.o).weight.zero_()
            ad.proj(layer, ad.mlp_out).weight.zero_()
    return model, ad


def _ids(n=8, t=32, seed=1, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


def _scores(model, ad, ids=None):
    stats = capture_stats(model, ad, _ids() if ids is None else ids, requests={"cosine"}, batch_size=4)
    return get_method("llm-streamline").score(model, ad, stats, StreamlineSettings())


# -- pure scoring maths -------------------------------------------------------------------------


def _toy_cos():
    # 4 layers -> states x0..x4; hand-made symmetric cosine matrix
    c = torch.tensor(
        [
            [1.00, 0.50, 0.40, 0.30, 0.20],
            [0.50, 1.00, 0.90, 0.70, 0.60],
            [0.40, 0.90, 1.00, 0.80, 0.50],
            [0.30, 0.70, 0.80, 1.00, 0.95],
            [0.20, 0.60, 0.50, 0.95, 1.00],
        ],
        dtype=torch.float64,
    )
    return c


def test_block_cosines_and_choice_on_toy_matrix():
    c = _toy_cos()
    assert torch.allclose(block_cosines(c, 2), torch.tensor([0.40, 0.70, 0.50], dtype=torch.float64))
    assert best_block(c, 1) == 3  # cos(x3, x4) = 0.95
    assert best_block(c, 2) == 1  # cos(x1, x3) = 0.70
    assert best_block(c, 4) == 0
    with pytest.raises(ConfigError):
        block_cosines(c, 5)


def test_shortgpt_removes_least_influential_layers_not_contiguous():
    c = _toy_cos()
    bi = block_influence(c)
    assert torch.allclose(bi, torch.tensor([0.50, 0.10, 0.20, 0.05], dtype=torch.float64))
    model = tiny_model("llama", n_layers=4)
    ad = adapter_for(model)
    per = count_params(ad.layers(model)[0])
    plan = select_shortgpt(model, ad, {"block_cos": c, "layer_bi": bi}, None, {"n_layers": 2})
    assert [lp.keep for lp in plan.layers] == [True, False, True, False]  # layers 1 and 3: BI 0.10, 0.05
    assert plan.params_before - plan.params_after == 2 * per
    # the most redundant *contiguous* 2-block is a different choice: cos(x1, x3) = 0.70
    plan_s = select(model, ad, {"block_cos": c, "layer_bi": bi}, None, {"n_layers": 2, "replacement": "none"})
    assert [lp.keep for lp in plan_s.layers] == [True, False, False, True]


# -- block choice on a model with identity layers -------------------------------------------------


def test_block_choice_picks_identity_layers():
    model, ad = _identity_model()
    sc = _scores(model, ad)
    cos = sc["block_cos"]
    assert cos.shape == (7, 7)
    assert cos[2, 4] == pytest.approx(1.0, abs=1e-6)
    assert float(block_cosines(cos, 2).sort(descending=True).values[1]) < 0.999  # a clear winner
    # the ratio decides n: two layers' worth of parameters -> two layers
    total, per = count_params(model), count_params(ad.layers(model)[0])
    plan = select(model, ad, sc, 2 * per / total, {"replacement": "none"})
    assert [lp.index for lp in plan.layers if not lp.keep] == [2, 3]
    assert plan.notes["block"] == [2, 4]
    assert plan.params_after == total - 2 * per
    # replacement variant: n=1 removed net, m=2 layers [2, 4) replaced by one layer inheriting layer 2
    plan_l = select(model, ad, sc, per / total, {"replacement": "layer"})
    assert plan_l.layers[2].keep and plan_l.layers[2].replacement == {"kind": "layer", "span": [2, 4]}
    assert [lp.index for lp in plan_l.layers if not lp.keep] == [3]
    # ShortGPT: the two zero-influence layers
    plan_g = select_shortgpt(model, ad, sc, None, {"n_layers": 2})
    assert [lp.index for lp in plan_g.layers if not lp.keep] == [2, 3]


def test_pruned_identity_block_leaves_logits_unchanged():
    model, ad = _identity_model()
    sc = _scores(model, ad)
    plan = select(model, ad, sc, None, {"replacement": "none", "n_layers": 2})
    ids = _ids(2, 16, seed=5)
    with torch.no_grad():
        ref = model(ids).logits
        pruned = apply_plan(copy.deepcopy(model), plan)
        out = pruned(ids).logits
    assert pruned.config.num_hidden_layers == 4
    assert torch.allclose(ref, out, atol=1e-5)


def test_errors_name_the_field():
    model, ad = _identity_model()
    sc = _scores(model, ad)
    with pytest.raises(ConfigError, match="ratio"):
        select(model, ad, sc, 1.5, {})
    with pytest.raises(ConfigError, match="n_layers"):
        select(model, ad, sc, None, {"n_layers": 6})
    with pytest.raises(ConfigError, match="method.settings.replacement"):
        get_method("llm-streamline").parse_settings({"replacement": "attention"})
    with pytest.raises(ConfigError, match="one of"):
        get_method("shortgpt").parse_settings({"bogus": 1})
    opt = tiny_model("opt", n_layers=4)
    ad_o = adapter_for(opt)
    sc_o = {"block_cos": _toy_cos(), "layer_bi": block_influence(_toy_cos())}
    with pytest.raises(ConfigError, match="replacement"):
        apply_plan(opt, select(opt, ad_o, sc_o, None, {"replacement": "ffn", "n_layers": 1}))
    plan_none = select(model, ad, sc, None, {"replacement": "none", "n_layers": 1})
    with pytest.raises(ConfigError, match="plan"):
        train_replacement(model, copy.deepcopy(model), plan_none, _ids())


# -- training ------------------------------------------------------------------------------------


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    s = StreamlineSettings(lr=2e-4, min_lr=5e-5, warmup_steps=4)
    lrs = [lr_at(i, 20, s) for i in range(20)]
    assert lrs[:4] == pytest.approx([5e-5, 1e-4, 1.5e-4, 2e-4])
    assert lrs[4] == pytest.approx(2e-4)
    assert lrs[-1] == pytest.approx(5e-5)  # the floor is reached at the last optimiser step
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_training_inputs_are_causal_and_exact():
    """The replacement is called with the real model's kwargs: a copy of layer l reproduces the
    dense layer's output exactly, and outputs never depend on later tokens (no bidirectional bug)."""
    model, ad = _identity_model(ident=())
    ids = _ids(2, 24, seed=3)
    x, kw, y = block_io(model, ad, ids, 1, 2)
    layer = copy.deepcopy(ad.layers(model)[1])
    with torch.no_grad():
        out = layer(x, **kw)
        out = out[0] if isinstance(out, tuple) else out
        assert torch.allclose(out, y, atol=1e-6)
        ids2 = ids.clone()
        ids2[:, 12:] = (ids2[:, 12:] + 7) % 128
        x2, kw2, _ = block_io(model, ad, ids2, 1, 2)
        out2 = layer(x2, **kw2)
        out2 = out2[0] if isinstance(out2, tuple) else out2
    assert torch.allclose(out[:, :12], out2[:, :12], atol=1e-6)
    assert not torch.allclose(out[:, 12:], out2[:, 12:], atol=1e-3)


def _heldout_mse(dense, pruned, plan, ids):
    ad = adapter_for(dense)
    new_idx, start, end, _ = replacement_of(plan)
    x, kw, y = block_io(dense, ad, ids, start, end)
    with torch.no_grad():
        out = ad.layers(pruned)[new_idx](x, **kw)
        out = out[0] if isinstance(out, tuple) else out
    return float(torch.nn.functional.mse_loss(out, y))


@pytest.mark.parametrize("kind", ["layer", "ffn"])
def test_trained_replacement_lowers_heldout_mse(kind):
    # weights large enough that the dropped layers matter; a 16-token alphabet so that held-out
    # blocks share structure with the training blocks
    dense = tiny_model("llama", n_layers=6, seed=2, initializer_range=0.1)
    ad = adapter_for(dense)
    sc = _scores(dense, ad, _ids(8, 32, vocab=16))
    plan = select(dense, ad, sc, None, {"replacement": kind, "n_layers": 2})
    pruned = apply_plan(copy.deepcopy(dense), plan)
    assert pruned.config.num_hidden_layers == 4
    idx = plan.notes["block"][0]
    if kind == "ffn":
        assert isinstance(ad.layers(pruned)[idx], ResidualFFN)
    heldout = _ids(4, 32, seed=99, vocab=16)  # never seen by training nor validation
    before = _heldout_mse(dense, pruned, plan, heldout)
    s = {
        "replacement": kind,
        "steps": 60,
        "batch_size": 8,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 2,
        "eval_every": 20,
    }
    res = train_replacement(dense, pruned, plan, _ids(48, 32, seed=7, vocab=16), s)
    after = _heldout_mse(dense, pruned, plan, heldout)
    assert len(res["loss_curve"]) == 60 and res["lr_curve"][-1] == pytest.approx(3e-4)
    assert res["val_mse_after"] < res["val_mse_before"]
    assert after < 0.6 * before, (before, after)
    # only the replacement moved
    for i, (a, b) in enumerate(zip(ad.layers(dense), ad.layers(pruned))):
        if i < idx:
            assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.equal(dense.lm_head.weight, pruned.lm_head.weight)


# -- checkpoints ---------------------------------------------------------------------------------


def test_layer_variant_saves_stock_hf_and_generates_with_cache(tmp_path):
    from transformers import AutoModelForCausalLM

    dense = tiny_model("llama", n_layers=6, seed=4)
    ad = adapter_for(dense)
    plan = select(dense, ad, _scores(dense, ad), None, {"replacement": "layer", "n_layers": 3})
    pruned = apply_plan(copy.deepcopy(dense), plan)
    save_pruned(pruned, None, plan, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.num_hidden_layers == 3 and len(loaded.model.layers) == 3
    assert [lyr.self_attn.layer_idx for lyr in loaded.model.layers] == [0, 1, 2]
    ids = _ids(1, 10, seed=8)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, pruned(ids).logits, atol=1e-5)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = loaded.generate(ids, use_cache=True, **kw)
    no_cache = loaded.generate(ids, use_cache=False, **kw)
    assert with_cache.shape == (1, 18)
    assert torch.equal(with_cache, no_cache)


def test_ffn_variant_roundtrips_through_the_project_loader(tmp_path):
    dense = tiny_model("llama", n_layers=6, seed=5)
    ad = adapter_for(dense)
    plan = select(dense, ad, _scores(dense, ad), None, {"replacement": "ffn", "n_layers": 2})
    pruned = apply_plan(copy.deepcopy(dense), plan)
    # the FFN costs less than the layer it stands in for: params_after is exact
    assert (
        count_params(pruned)
        == plan.params_after
        < count_params(dense) - 2 * count_params(ad.layers(dense)[0])
    )
    save_pruned(pruned, None, plan, tmp_path / "f")
    loaded, _ = load_pruned(tmp_path / "f")
    kinds = [getattr(lyr, "pruneflow_kind", "decoder") for lyr in ad.layers(loaded)]
    assert kinds.count("ffn") == 1 and len(kinds) == 4  # 3 layers -> 1 FFN: 2 removed net
    ids = _ids(1, 10, seed=9)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, pruned(ids).logits, atol=1e-5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(
        loaded.generate(ids, use_cache=True, **kw), loaded.generate(ids, use_cache=False, **kw)
    )


def test_cached_targets_run_the_dense_prefix_once_per_batch():
    dense = tiny_model("llama", n_layers=6, seed=2, initializer_range=0.1)
    ad = adapter_for(dense)
    plan = select(
        dense, ad, _scores(dense, ad, _ids(8, 32, vocab=16)), None, {"replacement": "layer", "n_layers": 2}
    )
    calls = []
    dense.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1))
    s = {"steps": 30, "batch_size": 8, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "eval_every": 10}
    heldout = _ids(4, 32, seed=99, vocab=16)
    for cache, expected in ((False, 30 + 4), (True, 6 + 1)):  # 42 train blocks = 6 batches, 1 val batch
        pruned = apply_plan(copy.deepcopy(dense), plan)
        before = _heldout_mse(dense, pruned, plan, heldout)
        calls.clear()
        res = train_replacement(
            dense, pruned, plan, _ids(48, 32, seed=7, vocab=16), {**s, "cache_targets": cache}
        )
        assert len(calls) == expected
        assert res["val_mse_after"] < res["val_mse_before"]
        assert _heldout_mse(dense, pruned, plan, heldout) < 0.7 * before


def test_laco_collapse_merges_the_block_into_one_plain_layer():
    from pruning_core.surgery import sync_config

    dense = tiny_model("llama", n_layers=6, seed=6)
    ad = adapter_for(dense)
    plan = select(dense, ad, _scores(dense, ad), None, {"replacement": "collapse", "n_layers": 2})
    a, b = plan.notes["block"]
    assert b - a == 3 and count_params(dense) - plan.params_after == 2 * count_params(ad.layers(dense)[0])
    block = [ad.layers(dense)[i] for i in range(a, b)]
    pruned = apply_plan(copy.deepcopy(dense), plan)
    merged = ad.layers(pruned)[a]
    w = [ad.proj(lyr, "down_proj").weight for lyr in block]
    assert torch.allclose(ad.proj(merged, "down_proj").weight, w[0] + (w[1] - w[0]) + (w[2] - w[0]))
    assert torch.equal(merged.input_layernorm.weight, block[0].input_layernorm.weight)
    assert getattr(merged, "pruneflow_kind", "decoder") == "decoder" and sync_config(pruned)  # stock HF shape
    assert len(ad.layers(pruned)) == 4 and count_params(pruned) == plan.params_after


def test_replacement_recover_takes_a_token_stream_and_rejects_unknown_settings():
    from pruning_core.recover import replacement_recover

    dense = tiny_model("llama", n_layers=4, seed=3, initializer_range=0.1)
    ad = adapter_for(dense)
    plan = select(dense, ad, _scores(dense, ad), None, {"replacement": "ffn", "n_layers": 1})
    pruned = apply_plan(copy.deepcopy(dense), plan)
    stream = _ids(1, 20 * 16, seed=4, vocab=16).reshape(-1)
    m, info = replacement_recover(pruned, dense, plan, stream, {"seq_len": 16, "steps": 5, "batch_size": 4})
    assert m is pruned and len(info["loss_curve"]) == 5 and info["train_tokens"] == 5 * 4 * 16
    assert info["val_mse_after"] <= info["val_mse_before"]
    with pytest.raises(ConfigError, match="recovery.settings"):
        replacement_recover(pruned, dense, plan, stream, {"rank": 8})


@pytest.mark.parametrize("kind", ["layer", "ffn"])
def test_recover_step_trains_the_replacement_of_the_shared_prune_checkpoint(kind, tmp_path):
    """Score+select (the prune step, shared by recovery none and replacement) leaves the replacement
    untrained; `recover.replacement_recover` on the saved checkpoint trains it, and the saved result
    reloads with the trained weights (held-out MSE well below the untrained one)."""
    from pruning_core.recover import replacement_recover

    dense = tiny_model("llama", n_layers=6, seed=2, initializer_range=0.1)
    meth = get_method("llm-streamline")
    assert not meth.coupled  # capture + score + select: nothing trained in the prune step
    ad = adapter_for(dense)
    calib = _ids(48, 32, seed=7, vocab=16)
    heldout = _ids(4, 32, seed=99, vocab=16)
    st = meth.parse_settings({"replacement": kind, "n_layers": 2, "batch_size": 8, "lr": 3e-3, "min_lr": 3e-4,
                              "warmup_steps": 2, "steps": 40})
    stats = capture_stats(dense, ad, calib, requests={"cosine"}, batch_size=8)
    plan = meth.select(dense, ad, meth.score(dense, ad, stats, st), None, st)
    pruned = apply_plan(copy.deepcopy(dense), plan)
    untrained = _heldout_mse(dense, pruned, plan, heldout)
    save_pruned(pruned, None, plan, tmp_path / "none")  # what `recovery: none` keeps
    m0, _ = load_pruned(tmp_path / "none")
    assert _heldout_mse(dense, m0, plan, heldout) == pytest.approx(untrained, rel=1e-5)
    m1, info = replacement_recover(m0, dense, plan, calib, None)  # settings from the plan
    assert len(info["loss_curve"]) == 40 and info["val_mse_after"] < info["val_mse_before"]
    save_pruned(m1, None, plan, tmp_path / "replacement")
    m2, _ = load_pruned(tmp_path / "replacement")
    trained = _heldout_mse(dense, m2, plan, heldout)
    assert trained < 0.7 * untrained, (untrained, trained)


@pytest.mark.parametrize("kind", ["layer", "ffn"])
def test_replacement_trains_from_the_dense_block_alone_exactly_as_from_the_dense_model(kind, tmp_path):
    """The recover step holds the pruned model and only the removed block's dense layers (read with
    `open_model(only_layers=...)`; the rest of the dense model stays on `meta`): the pruned prefix
    gives the block's inputs, so training sees the same inputs and targets as with the whole dense
    model — the same loss curve and the same trained weights."""
    from pruning_core.loading import open_model

    dense = tiny_model("llama", n_layers=6, seed=2, initializer_range=0.1)
    dense.save_pretrained(tmp_path / "dense")
    ad = adapter_for(dense)
    plan = select(dense, ad, _scores(dense, ad), None, {"replacement": kind, "n_layers": 2})
    _, start, end, _ = replacement_of(plan)
    calib = _ids(24, 32, seed=7, vocab=16)
    s = {"steps": 12, "batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "eval_every": 4}
    p_full = apply_plan(copy.deepcopy(dense), plan)
    p_block = copy.deepcopy(p_full)
    save_pruned(p_full, None, plan, tmp_path / "untrained")
    full = train_replacement(dense, p_full, plan, calib, s)

    opened, _ = open_model(tmp_path / "dense", with_tokenizer=False, only_layers=list(range(start, end)))
    layers = adapter_for(opened).layers(opened)
    assert all(p.device.type == "meta" for j, lyr in enumerate(layers) if not start <= j < end for p in lyr.parameters())
    assert opened.get_input_embeddings().weight.device.type == "meta"
    block = train_replacement([layers[j] for j in range(start, end)], p_block, plan, calib, s)

    assert block["loss_curve"] == pytest.approx(full["loss_curve"], rel=1e-5, abs=1e-7)
    assert block["val_mse_after"] == pytest.approx(full["val_mse_after"], rel=1e-5)
    for (k, a), (_, b) in zip(p_full.state_dict().items(), p_block.state_dict().items(), strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), k
    with pytest.raises(ConfigError, match="recovery"):
        train_replacement([layers[start]] * (end - start + 1), p_block, plan, calib, s)

    # the recover step under offload / disk: the pruned model's layers come and go, the trained one stays;
    # the result is written layer by layer (the plan recorded, not applied again) and reloads the same
    from pruning_core.checkpoint import save_streaming

    for placement in ("offload", "disk"):
        m, _ = load_pruned(tmp_path / "untrained", placement=placement)
        res = train_replacement([layers[j] for j in range(start, end)], m, plan, calib, s)
        assert res["loss_curve"] == pytest.approx(full["loss_curve"], rel=1e-5, abs=1e-7), placement
        save_streaming(m, None, plan, tmp_path / placement, apply=False)
        back, _ = load_pruned(tmp_path / placement)
        for (k, a), (_, b) in zip(p_full.state_dict().items(), back.state_dict().items(), strict=True):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (placement, k)
        assert (tmp_path / placement / "plan.json").is_file()


def test_a_bf16_model_trains_its_replacement_in_fp32_and_keeps_bf16():
    """bf16 weights (the GPU path): the replacement trains on fp32 master weights (inputs, rotary
    tables and masks cast for it) and goes back to bf16; the rest of the model is untouched."""
    dense = tiny_model("llama", n_layers=6, seed=2, initializer_range=0.1).to(torch.bfloat16)
    ad = adapter_for(dense)
    plan = select(dense, ad, _scores(dense.float(), ad), None, {"replacement": "layer", "n_layers": 2})
    dense = dense.to(torch.bfloat16)
    pruned = apply_plan(copy.deepcopy(dense), plan)
    _, start, end, _ = replacement_of(plan)
    new_idx = replacement_of(plan)[0]
    others = {k: v.clone() for k, v in pruned.state_dict().items() if f"layers.{new_idx}." not in k}
    res = train_replacement([ad.layers(dense)[j] for j in range(start, end)], pruned, plan, _ids(24, 32, seed=7, vocab=16),
                            {"steps": 12, "batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2})
    assert res["val_mse_after"] < res["val_mse_before"]
    assert all(p.dtype == torch.bfloat16 for p in pruned.parameters())
    assert all(torch.equal(v, pruned.state_dict()[k]) for k, v in others.items())
