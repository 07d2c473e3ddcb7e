"""A process killed between `replace_dir`'s two renames leaves only `.name.old-PID`: the next reader
or writer puts it back (and a leftover beside a complete folder is removed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]

KILL_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
import pruning_core.util as u
real = os.replace
def replace(a, b):
    real(a, b)
    os.kill(os.getpid(), signal.SIGKILL)  # right after the first rename: path -> .path.old-PID
u.os.replace = replace
u.replace_dir(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def _killed_replace(tmp_path: Path, src: Path, ckpt: Path) -> None:
    new = tmp_path / "new"
    shutil.copytree(src, new)
    p = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(new), str(ckpt)], cwd=REPO)
    assert p.returncode != 0
    assert not ckpt.exists() and list(tmp_path.glob(f".{ckpt.name}.old-*"))


def test_a_reader_restores_a_checkpoint_a_killed_replace_left_aside(tmp_path, tiny_llama_dir):
    from pruning_core.checkpoint import load_pruned

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_dir, ckpt)
    ref, _ = load_pruned(ckpt)
    _killed_replace(tmp_path, tiny_llama_dir, ckpt)
    m, _ = load_pruned(ckpt)  # the old folder is back
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert not list(tmp_path.glob(".ckpt.old-*"))


def test_the_next_writer_restores_then_replaces(tmp_path, tiny_llama_dir):
    from pruning_core.util import replace_dir

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llama_dir, ckpt)
    _killed_replace(tmp_path, tiny_llama_dir, ckpt)
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "marker").write_text("new")
    replace_dir(newer, ckpt)
    assert (ckpt / "marker").read_text() == "new"
    assert not list(tmp_path.glob(".ckpt.old-*")) and not newer.exists()
