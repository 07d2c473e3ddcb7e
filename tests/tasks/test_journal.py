"""Who owns a leftover: disk-placement spills carry their owner's tag and are reclaimed once the owner is
gone (never while it lives), in $PRUNEFLOW_SCRATCH as in $TMPDIR."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from pruning_core.weightfiles import TensorFiles, owner_tag
from tasks import cleanup, journal


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_spill_is_named_after_its_owner_and_reclaimed_only_once_it_is_dead(tiny_llama_dir, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("PRUNEFLOW_SCRATCH", str(scratch))
    monkeypatch.setenv("PRUNEFLOW_HOME", str(tmp_path / "home"))
    assert owner_tag() == journal.owner_tag()  # pruning_core's tag is the one the journal reads
    files = TensorFiles(tiny_llama_dir)
    files.spill({"x": torch.ones(3)})
    assert files.spill_dir.parent == scratch and files.spill_dir.name.startswith(f"pruneflow-spill-{owner_tag()}-")
    assert files.spill_dir not in journal.dead_scratch()  # its owner (this process) is alive
    # a killed process's spill, in $PRUNEFLOW_SCRATCH and in $TMPDIR
    dead = _dead_pid()
    gone = [scratch / f"pruneflow-spill-{dead}.{journal.host_id()}-abc",
            tmp_path / "tmp" / f"pruneflow-spill-{dead}.{journal.host_id()}-abc"]
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", None)
    for d in gone:
        d.mkdir(parents=True)
        (d / "spill-00000.safetensors").write_bytes(b"x" * 10)
    old = scratch / "pruneflow-spill-untagged_a"  # an older release's: reclaimed after a day
    old.mkdir()
    fresh = scratch / "pruneflow-spill-untagged_b"
    fresh.mkdir()
    os.utime(old, (time.time() - 2 * journal.STALE_S,) * 2)
    assert set(journal.dead_scratch()) == {*gone, old}
    done = cleanup.reclaim()
    assert set(done["scratch"]) == {str(p) for p in (*gone, old)}
    assert not any(p.exists() for p in (*gone, old)) and files.spill_dir.exists() and fresh.exists()


def test_watchdog_reclaims_the_dead_writers_store_temporaries(tmp_path, monkeypatch):
    """The journal names the stores a process writes to; reaping it removes that process's uncommitted
    store folders (the watchdog does this right after a SIGKILL)."""
    from tasks.store import TMP_PREFIX, open_store

    monkeypatch.setenv("PRUNEFLOW_HOME", str(tmp_path / "home"))
    url = str(tmp_path / "store")
    open_store(url)
    dead = _dead_pid()
    torn = tmp_path / "store" / "objects" / "ab" / f"{TMP_PREFIX}abcdef012345-{dead}.{journal.host_id()}-1234abcd"
    torn.mkdir(parents=True)
    live = torn.parent / f"{TMP_PREFIX}abcdef012345-{journal.owner_tag()}-1234abcd"
    live.mkdir()
    path = journal.journal_dir() / f"{dead}.{journal.host_id()}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": dead, "host": journal.host_id(), "stores": [url]}))
    cleanup.reap(path, journal.read(path), {"uploads_aborted": [], "flow_runs_crashed": [], "servers_stopped": []})
    assert not torn.exists() and live.exists() and not path.exists()
