"""End to end on the real embedded model (SmolLM2-135M): prune 20 % of heads and FFN channels with a
baseline, save, reload in one call, same logits, physically smaller, perplexity still sane."""

import pytest
import torch

from pruning_core import (
    calibration_set,
    count_params,
    eval_tokens,
    is_uniform,
    load_model,
    load_pruned,
    perplexity,
    prune,
    save_pruned,
)

pytestmark = pytest.mark.slow


def test_prune_save_reload_smollm2(tmp_path):
    model, tok = load_model("smollm2-135m", device="cpu")
    before = count_params(model)
    ev = eval_tokens(tok)
    ppl0 = perplexity(model, ev, seq_len=128, max_windows=4)
    calib = calibration_set(tok, n_samples=8, seq_len=128, seed=0)
    plan = prune(model, "wanda", calib, ratio=0.2)
    after = count_params(model)
    assert after == plan.params_after < before
    # ratio = 20 % of each decoder layer's 3,540,096 parameters = 708,019: 9 q / 3 KV heads, 20 % of 3
    # groups rounds to 1 group (294,912 params); the FFN absorbs the rest: 413,107 / 1,728 = 239 channels,
    # FFN 1536 -> 1297 (select.removal_counts)
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.out_features == 6 * 64 and layer.mlp.down_proj.in_features == 1297
    ppl1 = perplexity(model, ev, seq_len=128, max_windows=4)
    assert ppl0["protocol"] == "fixed_window_128" and 1 < ppl0["ppl"] < ppl1["ppl"] < 50 * ppl0["ppl"]
    path = save_pruned(model, tok, plan, tmp_path / "smollm2-wanda-20")
    assert is_uniform(path)
    m2, tok2 = load_pruned(path)
    ids = ev[:64].unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(m2(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    out = m2.generate(tok2("The capital of France is", return_tensors="pt").input_ids, max_new_tokens=5,
                      do_sample=False)
    assert out.shape[1] > 5
