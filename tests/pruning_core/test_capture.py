"""The layer-by-layer streamed capture equals a whole-model hook capture."""

import pytest
import torch
import torch.nn.functional as F

from pruning_core import adapter_for, capture_stats, tiny_model
from pruning_core.engine import run_pass
from pruning_core.errors import ConfigError


def whole_model_capture(model, ids):
    a = adapter_for(model)
    acc = {}
    hs = []

    def add(k, v):
        acc[k] = acc.get(k, 0) + v

    hooks = []
    for i, layer in enumerate(a.layers(model)):
        def on_o(m, args, out, i=i):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            add(f"layer.{i}.attn_gram", x.T @ x)
            add(f"layer.{i}.attn_in_sq", (x * x).sum(0))

        def on_down(m, args, out, i=i):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            add(f"layer.{i}.mlp_gram", x.T @ x)
            add(f"layer.{i}.mlp_in_sum", x.sum(0))

        def on_layer_in(m, args, kwargs):
            hs.append((args[0] if args else kwargs["hidden_states"]).detach())

        hooks.append(a.proj(layer, a.o).register_forward_hook(on_o))
        hooks.append(a.proj(layer, a.mlp_out).register_forward_hook(on_down))
        hooks.append(layer.register_forward_pre_hook(on_layer_in, with_kwargs=True))
    last = []
    hooks.append(a.layers(model)[-1].register_forward_hook(
        lambda m, args, out: last.append(out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    states = hs + last
    cos = torch.zeros(len(states), len(states))
    for i in range(len(states)):
        for j in range(len(states)):
            cos[i, j] = F.cosine_similarity(states[i].double(), states[j].double(), dim=-1).mean()
    return acc, cos


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_streamed_equals_whole_model(family):
    m = tiny_model(family, n_layers=3)
    ids = torch.randint(0, 128, (6, 20), generator=torch.Generator().manual_seed(0))
    st = capture_stats(m, adapter_for(m), ids, requests={"attn_gram", "mlp_gram", "cosine"}, batch_size=4,
                       stat_dtype=torch.float64)
    ref, cos = whole_model_capture(m, ids)
    for k, v in ref.items():
        torch.testing.assert_close(st[k], v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st["cosine"].double(), cos.double(), rtol=1e-4, atol=1e-5)
    assert int(st["tokens"]) == 120


def test_stream_outputs_match_model_hidden_state():
    m = tiny_model("llama", n_layers=3)
    a = adapter_for(m)
    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(2))
    final = torch.cat(run_pass(m, a, [], ids, batch_size=2, keep_final=True).final_hidden)
    with torch.no_grad():
        ref = m.model(input_ids=ids, output_hidden_states=True).hidden_states
    # HF's last hidden state is after the final norm: compare through it
    torch.testing.assert_close(m.model.norm(final), ref[-1], rtol=1e-5, atol=1e-5)


def test_unknown_request_rejected():
    m = tiny_model("llama", n_layers=1)
    with pytest.raises(ConfigError, match="capture.requests"):
        capture_stats(m, adapter_for(m), torch.zeros(1, 4, dtype=torch.long), requests={"hessian"})


def test_stream_gives_each_layer_its_own_mask_sliding_window_mix():
    """Qwen2 with full-attention layers 0-1 and sliding-window layers 2-3 (window 4 < 16 tokens): the
    streamed layer inputs equal the real forward's, so the sliding layers got the sliding mask."""
    m = tiny_model("qwen2", n_layers=4, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    assert m.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    a = adapter_for(m)
    real = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: real.append(out[0] if isinstance(out, tuple) else out))
             for layer in a.layers(m)]
    with torch.no_grad():
        m(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    class Outputs:  # a consumer that keeps every layer's outputs
        def __init__(self):
            self.outs, self.steps = [], []

        def after(self, step):
            self.outs.append(torch.cat(step.outputs))
            self.steps.append((step.inputs, step.kwargs))
            return False

    rec = Outputs()
    run_pass(m, a, [rec], ids, batch_size=2)
    streamed = rec.outs
    for i, (got, want) in enumerate(zip(streamed, real)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"layer {i}")
    # and the sliding mask matters here: the full mask on layer 2 gives something else
    rec = Outputs()
    run_pass(m, a, [rec], ids, batch_size=3)
    full_kw = rec.steps[0][1][0]
    wrong = a.layers(m)[2](rec.steps[2][0][0], **full_kw)
    assert not torch.allclose(wrong[0] if isinstance(wrong, tuple) else wrong, real[2], atol=1e-3)


@pytest.mark.parametrize("method,ratio", [("llm-streamline", 0.3), ("shortgpt", 0.3)])
def test_cosine_capture_keeps_only_the_span_the_method_compares(method, ratio):
    """A depth method's capture keeps the states of the layers it compares at its ratio (Streamline: a
    block of m + 1 layers; ShortGPT: consecutive layers), not of every layer: the cosines inside that
    band equal the full capture's, the rest are never computed, and the plan is the same."""
    from pruning_core.methods import get_method

    model = tiny_model("llama", n_layers=8, seed=4)
    ad = adapter_for(model)
    ids = torch.randint(0, model.config.vocab_size, (6, 24), generator=torch.Generator().manual_seed(0))
    meth = get_method(method)
    st = meth.parse_settings({"replacement": "layer"} if method == "llm-streamline" else {})
    span = meth.cosine_span(model, ad, [ratio], st)
    assert 1 <= span < len(ad.layers(model)) and (method != "shortgpt" or span == 1)
    full = capture_stats(model, ad, ids, requests={"cosine"})["cosine"]
    band = capture_stats(model, ad, ids, requests={"cosine"}, cosine_span=span)["cosine"]
    dist = (torch.arange(9)[:, None] - torch.arange(9)[None, :]).abs()
    assert torch.allclose(band[dist <= span], full[dist <= span], atol=1e-6)
    assert torch.all(band[dist > span] == 0) and torch.all(full[dist > span] != 0)
    plans = [meth.select(model, ad, meth.score(model, ad, {"cosine": c}, st), ratio, st) for c in (full, band)]
    assert [lp.keep for lp in plans[0].layers] == [lp.keep for lp in plans[1].layers]
