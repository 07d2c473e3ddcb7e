"""lm-eval on offline tasks (tiny checkpoint on disk), stability maths, retention maths."""

from __future__ import annotations

import math

import pytest
import torch

from pruning_core import evaltasks
from pruning_core.errors import ConfigError, DataError
from pruning_core.evaluate import (
    check_tasks,
    flatten_metrics,
    metrics_record,
    offline_tasks,
    retention,
    run_lm_eval,
    stability,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def byte_tokenizer():
    """A lossless byte-level tokenizer (256 bytes + <eos>) built in memory: no hub, no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from pruning_core.checkpoint import save_pruned
    from pruning_core.models import tiny_model

    tok = byte_tokenizer()
    model = tiny_model("llama", n_layers=2, vocab_size=len(tok), max_position_embeddings=512)
    path = tmp_path_factory.mktemp("ev") / "ckpt"
    save_pruned(model, tok, None, path)
    return path, model, tok


def test_offline_tasks_are_deterministic_and_from_eval_split():
    assert offline_tasks() == ["pydoc_next_sentence", "pydoc_last_word", "pydoc_rolling", "pkgdocs_last_word"]
    ns = evaltasks.next_sentence_items()
    assert 100 <= len(ns) <= evaltasks.N_NEXT_SENTENCE  # as many as the eval split allows, capped
    for it in ns[:50]:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4 and 0 <= it["label"] < 4
    # rebuilt from scratch: identical items (no dependence on hashing or state)
    evaltasks.next_sentence_items.cache_clear()
    assert evaltasks.next_sentence_items() == ns
    # labels are not all in one position (the shuffle is real)
    assert len({it["label"] for it in ns}) == 4
    from pruning_core.data import load_text

    ev, tr = load_text("pydoc", "eval"), load_text("pydoc", "train")
    lw = evaltasks.last_word_items()
    assert all(it["target"].startswith(" ") and it["target"][1:].isalpha() for it in lw)
    assert all(it["context"].split()[-1] in " ".join(ev.split()) for it in lw[:20])
    docs = evaltasks.rolling_docs()
    assert sum(len(d["page"]) for d in docs) >= 0.95 * len(ev.strip())
    assert docs[0]["page"][:200] in ev and docs[0]["page"][:200] not in tr


def test_lm_eval_on_saved_tiny_checkpoint(tiny_ckpt):
    path, model, tok = tiny_ckpt
    out = run_lm_eval(str(path), ["pydoc_next_sentence", "pydoc_last_word", "pydoc_rolling"], limit=6, batch_size=6)
    r = out["results"]
    assert set(r["pydoc_next_sentence"]) == {"acc", "acc_norm"}
    assert 0.0 <= r["pydoc_next_sentence"]["acc"] <= 1.0
    assert set(r["pydoc_last_word"]) == {"acc", "perplexity"}
    assert r["pydoc_rolling"]["word_perplexity"] > 1.0 and r["pydoc_rolling"]["bits_per_byte"] > 0
    assert out["protocols"] == {"pydoc_rolling": "lm_eval_rolling_word"}
    ns = out["samples"]["pydoc_next_sentence"]
    assert [s["doc_id"] for s in ns] == list(range(6))
    items = evaltasks.next_sentence_items()
    for s in ns:
        assert s["target"] == items[s["doc_id"]]["label"]
        assert len(s["option_nll"]) == 4 and all(v > 0 for v in s["option_nll"])
        assert s["correct"] == (s["pred"] == s["target"])
    # acc is the mean of the per-sample correctness
    assert r["pydoc_next_sentence"]["acc"] == pytest.approx(sum(s["correct"] for s in ns) / len(ns))
    # the in-memory path gives the same numbers as the saved checkpoint
    mem = run_lm_eval(model, ["pydoc_next_sentence"], limit=6, tokenizer=tok, batch_size=6)
    assert mem["results"]["pydoc_next_sentence"] == r["pydoc_next_sentence"]
    for a, b in zip(mem["samples"]["pydoc_next_sentence"], ns):
        assert a["option_nll"] == pytest.approx(b["option_nll"], rel=1e-4)


def test_dense_results_cached_once(tiny_ckpt, tmp_path):
    from pruning_core.evaluate import cached_lm_eval

    path, _, _ = tiny_ckpt
    first = cached_lm_eval(path, ["pydoc_last_word"], cache_dir=tmp_path, limit=3, batch_size=3)
    again = cached_lm_eval(path, ["pydoc_last_word"], cache_dir=tmp_path, limit=3, batch_size=3)
    assert (first["cache"], again["cache"]) == ("miss", "hit")
    assert again["results"] == first["results"] and again["samples"] == first["samples"]
    assert len(list(tmp_path.glob("*.json"))) == 1
    # another task set (or limit) is another entry
    cached_lm_eval(path, ["pydoc_last_word"], cache_dir=tmp_path, limit=2, batch_size=2)
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_task_names_checked(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="boolq"):
        check_tasks(["pydoc_next_sentence", "boolq"])
    with pytest.raises(ConfigError, match="nonsense"):
        check_tasks(["nonsense"])
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert check_tasks(["boolq"]) == ["boolq"]


def _rec(doc_id, nll, correct):
    return {"doc_id": doc_id, "target": 0, "option_nll": nll, "pred": 0, "correct": correct}


def _upstream_script(dense, pruned):
    """calculate_stability.py as released: counts matches M, then sums the first M weights."""
    sig = torch.tensor([torch.tensor(d["option_nll"], dtype=torch.float64).std(unbiased=False) for d in dense])
    w = torch.softmax(sig, 0)
    m = sum(d["correct"] == p["correct"] for d, p in zip(dense, pruned))
    return float(w[:m].sum())


def test_stability_hand_computed_and_not_the_script_bug():
    dense = [_rec(0, [1.0, 3.0], True), _rec(1, [2.0, 2.0], False), _rec(2, [0.0, 4.0], True)]
    # item 0 flips (right -> wrong), item 1 both wrong (consistent), item 2 both right
    pruned = [_rec(0, [9, 9], False), _rec(1, [9, 9], False), _rec(2, [9, 9], True)]
    sig = [1.0, 0.0, 2.0]  # population std of [1,3], [2,2], [0,4]
    z = sum(math.exp(s) for s in sig)
    expected = (math.exp(0.0) + math.exp(2.0)) / z
    assert stability(dense, pruned) == pytest.approx(expected, abs=1e-12)
    buggy = _upstream_script(dense, pruned)  # sums w0 + w1
    assert buggy == pytest.approx((math.exp(1.0) + math.exp(0.0)) / z)
    assert abs(stability(dense, pruned) - buggy) > 0.1
    # matched by doc_id, not by order
    assert stability(dense, list(reversed(pruned))) == pytest.approx(expected, abs=1e-12)
    # identical correctness -> 1; dict form averages over tasks (rolling-only tasks are skipped)
    assert stability(dense, dense) == pytest.approx(1.0)
    roll = [{"doc_id": 0, "target": None, "option_nll": [5.0], "pred": None, "correct": None}]
    both = stability({"a": dense, "b": dense, "r": roll}, {"a": pruned, "b": dense, "r": roll})
    assert both == pytest.approx((expected + 1.0) / 2)
    with pytest.raises(DataError):
        stability({"r": roll}, {"r": roll})


def test_retention_maths():
    before = metrics_record(perplexity={"ppl": 10.0, "protocol": "fixed_window_256"},
                            lm_eval_results={"results": {"t": {"acc": 0.5, "acc_norm": 0.4}, "r": {"word_perplexity": 20.0}}},
                            efficiency={"decode_tokens_per_s": 100.0, "peak_mem_mb": 500.0, "params": 1e6})
    after = metrics_record(perplexity={"ppl": 12.5, "protocol": "fixed_window_256"},
                           lm_eval_results={"results": {"t": {"acc": 0.4, "acc_norm": 0.4}, "r": {"word_perplexity": 40.0}}},
                           efficiency={"decode_tokens_per_s": 150.0, "peak_mem_mb": 400.0, "params": 7e5})
    assert flatten_metrics(before)["ppl.fixed_window_256"] == 10.0
    ret = retention(before, after)
    assert ret["ppl.fixed_window_256"] == pytest.approx(0.8)  # inverted: 10 / 12.5
    assert ret["t/acc"] == pytest.approx(0.8)
    assert ret["t/acc_norm"] == pytest.approx(1.0)
    assert ret["r/word_perplexity"] == pytest.approx(0.5)
    assert ret["decode_tokens_per_s"] == pytest.approx(1.5)
    assert ret["peak_mem_mb"] == pytest.approx(1.25)
    assert "params" not in ret
    assert ret["average"] == pytest.approx((0.8 + 0.8 + 1.0 + 0.5) / 4)
    # the pipeline's flat metrics.json shape: protocol beside the value, `task.metric`, `eff.` prefix
    flat_b = {"ppl": 10.0, "ppl_protocol": "fixed_window_256", "ppl_tokens": 4000, "params": 100, "t.acc": 0.5,
              "eff.decode_tokens_per_s": 10.0}
    flat_a = {"ppl": 20.0, "ppl_protocol": "fixed_window_256", "ppl_tokens": 4000, "params": 70, "t.acc": 0.25,
              "eff.decode_tokens_per_s": 12.0}
    assert retention(flat_b, flat_a) == pytest.approx({"ppl.fixed_window_256": 0.5, "t/acc": 0.5,
                                                       "decode_tokens_per_s": 1.2, "average": 0.5})
    # metrics on one side only, or a zero denominator, are left out
    assert retention({"a/acc": 0.0, "b/acc": 0.5}, {"a/acc": 0.3}) == {}


def test_pkgdocs_cloze_comes_from_the_out_of_domain_text():
    from pruning_core.data import load_text

    lw = evaltasks.last_word_items(source="pkgdocs")
    assert len(lw) == evaltasks.N_LAST_WORD and lw == evaltasks.BUILDERS["pkgdocs_last_word"]()
    flat = " ".join(load_text("pkgdocs", "eval").split())
    # every item is the text itself: the context runs straight into its target word
    assert all(" ".join((it["context"] + it["target"]).split()) in flat for it in lw)
    assert not {it["context"] for it in lw} & {it["context"] for it in evaltasks.last_word_items()}
