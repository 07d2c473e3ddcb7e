import json

import pytest
import torch

from pruning_core import ConfigError, DataError, calibration_set, load_text
from pruning_core.data import eval_mask


class CharTok:
    """A stand-in tokenizer: one token per character (keeps these tests independent of any model)."""

    def __call__(self, text, add_special_tokens=False, return_attention_mask=False):
        return {"input_ids": [ord(c) % 1000 for c in text]}


def test_default_text_split_is_disjoint_and_complete():
    train, ev, full = load_text("pydoc", "train"), load_text("pydoc", "eval"), load_text("pydoc", "all")
    tp, ep = {p.strip() for p in train.split("\n\n")}, {p.strip() for p in ev.split("\n\n")}
    assert len(ev) > 0.15 * len(full) and len(train) > 0.6 * len(full)
    # whole topics: no paragraph of the eval part appears in the training part
    big = {p for p in ep if len(p) > 200}
    assert big and not (big & tp)


def test_eval_mask_fraction():
    m = eval_mask([10] * 100, 0.2)
    assert sum(m) == 20


def test_calibration_set_is_seeded_and_distinct():
    a = calibration_set(CharTok(), "pydoc", n_samples=8, seq_len=64, seed=3)
    b = calibration_set(CharTok(), "pydoc", n_samples=8, seq_len=64, seed=3)
    c = calibration_set(CharTok(), "pydoc", n_samples=8, seq_len=64, seed=4)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(r.tolist()) for r in a}) == 8


def test_too_little_text(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("short text")
    with pytest.raises(DataError, match=r"calibration.n_samples: got 4; accepted: at most 0 samples"):
        calibration_set(CharTok(), str(f), n_samples=4, seq_len=16, split="all")


def test_local_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * 20}) for i in range(10)))
    ids = calibration_set(CharTok(), str(tmp_path / "a.jsonl"), n_samples=2, seq_len=32, split="train")
    assert ids.shape == (2, 32)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["hello world " * 50] * 5}), tmp_path / "b.parquet")
    assert len(load_text(str(tmp_path / "b.parquet"), "all")) > 1000
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(DataError, match="'text' field"):
        load_text(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match="calibration.source"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match=r"\.txt, \.jsonl or \.parquet"):
        (tmp_path / "x.csv").write_text("a")
        load_text(str(tmp_path / "x.csv"))


def test_bad_split_and_sizes():
    with pytest.raises(ConfigError, match="split"):
        load_text("pydoc", "test")
    with pytest.raises(ConfigError, match="calibration.n_samples"):
        calibration_set(CharTok(), n_samples=0)


def test_hf_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="offline"):
        load_text("hf:wikitext:wikitext-2-raw-v1")


def test_random_windows_are_the_reference_loaders_draw(tmp_path):
    import random

    f = tmp_path / "t.txt"
    f.write_text("".join(chr(97 + (i * 7) % 26) for i in range(300)))
    ids = [ord(c) % 1000 for c in f.read_text()]
    got = calibration_set(CharTok(), str(f), n_samples=5, seq_len=64, seed=42, split="all", sampling="random_windows")
    random.seed(42)  # what the Wanda / LLM-Rank loaders do, window by window
    want = []
    for _ in range(5):
        a = random.randint(0, len(ids) - 64 - 1)
        want.append(ids[a:a + 64])
    assert got.tolist() == want
    # with replacement: more windows than the text has disjoint chunks
    assert calibration_set(CharTok(), str(f), 9, 64, seed=0, split="all", sampling="random_windows").shape == (9, 64)
    with pytest.raises(ConfigError, match="calibration.sampling: got 'shuffle'"):
        calibration_set(CharTok(), str(f), 2, 64, split="all", sampling="shuffle")


def test_prose_of_keeps_running_prose_only():
    from pruning_core.data import _prose_of

    doc = (
        "# Title\n\nThis library reads [the files](https://x.org/a) you give it and writes them **back** to disk.\n\n"
        "    code = block(that, is, indented)\n\n```\nfenced = 1\n```\n\n"
        "- A bullet item that is a whole sentence with enough words in it.\n\n"
        "Short line.\n\nCall `run()` to start the thing that does all of the work for you.\n\n"
        "| a | table | row | with | many | cells | in | it |\n"
    )
    assert _prose_of(doc) == [
        "This library reads the files you give it and writes them back to disk.",
        "A bullet item that is a whole sentence with enough words in it.",
    ]


def test_pkgdocs_is_evaluation_only_deterministic_and_disjoint_from_pydoc():
    from pruning_core.data import pkgdocs_documents

    ev = load_text("pkgdocs", "eval")
    assert load_text("pkgdocs", "all") == ev and len(ev) > 200_000  # ~75k SmolLM2 tokens with the lock's packages
    names = [n for n, _ in pkgdocs_documents()]
    assert names == sorted(names) and "pruneflow" not in names and len(names) > 100
    pkgdocs_documents.cache_clear()
    import mlflow  # noqa: F401 - it swaps importlib.metadata for the backport, whose Message has no payload

    assert load_text("pkgdocs", "eval") == ev  # the same text whatever was imported before
    paras = [p for p in ev.split("\n\n")]
    assert len(paras) == len(set(paras))  # every paragraph once
    pydoc = " ".join(load_text("pydoc", "all").split())
    assert not [p for p in paras if len(p) > 120 and p[:120] in pydoc]
    with pytest.raises(DataError, match="calibration.source: got 'pkgdocs'; accepted: .*evaluation-only"):
        load_text("pkgdocs", "train")
