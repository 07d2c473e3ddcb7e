"""Inputs enter step keys by their content: a file rewritten under the same path, size and mtime makes
the step that reads it miss; the capture follows the code of the method's span function."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pruning_core import digest

REPO = Path(__file__).resolve().parents[2]
M = {"sha256": "m" * 64, "uri": "/nonexistent"}


def _rewrite_same_size_and_mtime(path: Path) -> None:
    """Flip the content of `path` in place (same inode), keeping its size and setting its mtime back."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    i = len(data) // 2
    data[i] = (data[i] + 1) % 256 if data[i] not in (ord("\n"), ord('"')) else data[i]
    if bytes(data) == path.read_bytes():
        data[0] = (data[0] + 1) % 256
    with open(path, "r+b") as f:
        f.write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = path.stat()
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


@pytest.fixture
def inputs(tmp_path, pf_home, tiny_llama_dir):
    """A text file and a copy of the tiny model folder with the files a tokenizer or remote code adds."""
    text = tmp_path / "eval.txt"
    text.write_text("\n\n".join(f"Paragraph {i} says something plain about the weather and the sea."
                                for i in range(50)))
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    (model / "merges.txt").write_text("#version: 0.2\nT h\nt h\nh e\n")
    (model / "vocab.txt").write_text("the\nof\nand\n")
    (model / "modeling_custom.py").write_text("SCALE = 1.0\n")
    return text, model


def _keys(text: Path, model: Path) -> dict:
    from tasks import steps  # noqa: F401 - registers the steps
    from tasks.common import STEPS

    ctx = {"device": "cpu"}
    return {
        "evaluate": STEPS["evaluate"].key({"ctx": ctx, "target": M, "model_revision": "r",
                                           "settings": {"source": str(text), "ppl_seq_len": 32}}),
        "calibration": STEPS["calibration"].key({"ctx": ctx, "model": M, "source": str(text), "n_samples": 4,
                                                 "seq_len": 32, "seed": 0}),
        "recover": STEPS["recover"].key({"ctx": ctx, "checkpoint": M, "kind": "lora", "settings": {},
                                         "model_revision": "r", "train_source": str(text)}),
        "load": STEPS["load"].key({"ctx": ctx, "ref": str(model), "dtype": "float32"}),
    }


@pytest.mark.parametrize("remembered", [False, True], ids=["first-digest", "remembered-digest"])
def test_same_path_size_and_mtime_with_new_content_misses(inputs, pf_home, monkeypatch, remembered):
    """Evaluate, calibration and LoRA recovery re-key on the text file's bytes, load on every file of the
    model folder (tokenizer files, remote code, weights) — whether or not the digest was remembered."""
    from pruning_core.models import model_revision

    text, model = inputs
    if remembered:  # files older than RACY_S: their digests are remembered by the first key computation
        monkeypatch.setattr(digest, "RACY_S", -1e9)
    before = _keys(text, model)
    assert before == _keys(text, model)  # deterministic
    if remembered:
        assert len(list((pf_home / "cache" / "digests").rglob("*"))) > len(list(model.iterdir()))
    _rewrite_same_size_and_mtime(text)
    after = _keys(text, model)
    assert all(after[s] != before[s] for s in ("evaluate", "calibration", "recover")), (before, after)
    assert after["load"] == before["load"]
    for name in ("merges.txt", "vocab.txt", "modeling_custom.py", "tokenizer.json", "model.safetensors"):
        fp = model_revision(model)
        _rewrite_same_size_and_mtime(model / name)
        now = _keys(text, model)["load"]
        assert now != after["load"], name
        assert model_revision(model) != fp, name  # a cached load record is not reused either (model_valid)
        after["load"] = now


def test_unchanged_model_folder_is_not_read_again(inputs, pf_home, monkeypatch):
    """A remembered digest is reused: the second fingerprint of an unchanged folder hashes nothing."""
    from pruning_core.models import model_revision

    _text, model = inputs
    monkeypatch.setattr(digest, "RACY_S", -1e9)
    first = model_revision(model)
    hashed: list[str] = []
    real = digest.sha256_file
    monkeypatch.setattr(digest, "sha256_file", lambda p: hashed.append(str(p)) or real(p))
    assert model_revision(model) == first and hashed == []


def test_eval_key_covers_offline_task_files_and_efficiency_device(monkeypatch, pf_home):
    from pruning_core.evaltasks import TASK_DIR
    from tasks import steps
    from tasks.common import STEPS

    s = {"source": "pydoc", "ppl_seq_len": 32, "tasks": ["pydoc_last_word"], "efficiency": True}
    settings, _, _ = STEPS["evaluate"].keyparts({"ctx": {"device": "cpu"}, "target": M, "model_revision": "r",
                                                 "settings": s})
    assert settings["offline_tasks"]["files"] and settings["eval_text"].startswith("pydoc:")
    assert settings["efficiency_device"].startswith("cpu:")
    # the task YAMLs are data lm-eval reads, not imports: their digest is in the key
    files = digest.folder_files(TASK_DIR)
    assert {"pydoc_last_word.yaml", "pf_data.py"} <= {f.name for f in files}
    monkeypatch.setattr(steps, "_device_name", lambda ctx: "cuda:H200")
    other, _, _ = STEPS["evaluate"].keyparts({"ctx": {"device": "cpu"}, "target": M, "model_revision": "r",
                                              "settings": s})
    assert other["efficiency_device"] != settings["efficiency_device"]


_CAPTURE_KEYS = """
import json
from tasks import steps
from tasks.common import STEPS
m = {"sha256": "m" * 64}
out = {}
for meth in ("llm-streamline", "shortgpt"):
    p = {"model": m, "calib": m, "requests": ["cosine"], "batch_size": 8,
         "cosine_span": {"method": meth, "settings": {}, "ratios": [0.25]}}
    out[meth] = STEPS["capture"].key(p)
print(json.dumps(out))
"""


def _capture_keys(root: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _CAPTURE_KEYS], cwd=root, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_capture_misses_when_the_span_function_changes(tmp_path):
    """Streamline's `block_span` and ShortGPT's span decide which hidden states the capture keeps:
    editing either (in a copy of the project) gives that method a new capture key, and only that one."""
    copy = tmp_path / "repo"
    for top in ("pruning_core", "tasks", "flows"):
        shutil.copytree(REPO / top, copy / top, ignore=shutil.ignore_patterns("__pycache__"))
    before = _capture_keys(copy)
    sel = copy / "pruning_core" / "methods" / "streamline" / "selection.py"
    src = sel.read_text()
    head = "def block_span(model: nn.Module, adapter: Adapter, ratios, settings) -> int:\n"
    assert head in src
    sel.write_text(src.replace(head, head + "    # an edit that widens the span\n"))
    mid = _capture_keys(copy)
    assert mid["llm-streamline"] != before["llm-streamline"] and mid["shortgpt"] == before["shortgpt"]
    init = copy / "pruning_core" / "methods" / "streamline" / "__init__.py"
    src = init.read_text()
    assert "cosine_span=lambda *_: 1," in src
    init.write_text(src.replace("cosine_span=lambda *_: 1,", "cosine_span=lambda *_: 2,"))
    after = _capture_keys(copy)
    assert after["shortgpt"] != mid["shortgpt"]
