"""Cache checks trust the commit marker (sizes, digests, stat signatures) instead of re-reading every byte;
`pruneflow verify` re-hashes everything; the S3 download cache stays under its size bound."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tasks.store import ArtifactStore

MB = 1 << 20


def _io() -> dict[str, int]:
    return {k: int(v) for k, v in (ln.split(": ") for ln in Path("/proc/self/io").read_text().splitlines())}


def _checkpoint(root: Path, shards: int = 3, shard_mb: int = 16) -> Path:
    d = root / "checkpoint"
    d.mkdir(parents=True)
    for i in range(shards):
        (d / f"model-{i:05d}.safetensors").write_bytes(os.urandom(shard_mb * MB))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (d / "tokenizer.json").write_text(json.dumps({"vocab": list(range(1000))}))
    return d


def _rewrite_in_place(path: Path, keep_mtime: bool) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([(b[0] + 1) % 256]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_cached_check_of_a_checkpoint_reads_a_small_fraction_of_it(tmp_path, pf_home):
    """What a fully cached rerun does with a stored checkpoint — `valid` (the step's cache check) and
    `local_path` (the report reads its plan) — in a process that has never seen it: reads (rchar, page
    cache included) stay under 1 % of the checkpoint's bytes. Re-hashing it read 100 %."""
    store = ArtifactStore(str(tmp_path / "store"))
    man = store.put_dir(_checkpoint(tmp_path), "checkpoint", "test", move=True)
    fresh = ArtifactStore(str(tmp_path / "store"))  # nothing verified in this process
    before = _io()
    assert fresh.valid(man)
    path = fresh.local_path(man)
    assert (path / "config.json").exists()
    read = _io()["rchar"] - before["rchar"]
    assert read <= 0.01 * man["bytes"], f"read {read} of {man['bytes']} bytes"


def test_a_moved_or_resized_file_is_rehashed_and_caught(tmp_path, pf_home):
    store = ArtifactStore(str(tmp_path / "store"))
    man = store.put_dir(_checkpoint(tmp_path), "checkpoint", "test", move=True)
    shard = Path(man["uri"]) / "model-00001.safetensors"
    _rewrite_in_place(shard, keep_mtime=False)  # same size, new mtime: hashed again, caught
    assert not ArtifactStore(str(tmp_path / "store")).valid(man)
    man2 = store.put_dir(_checkpoint(tmp_path / "b"), "checkpoint", "test", move=True)
    (Path(man2["uri"]) / "config.json").write_text("{}")  # another size
    assert not ArtifactStore(str(tmp_path / "store")).valid(man2)
    man3 = store.put_dir(_checkpoint(tmp_path / "c"), "checkpoint", "test", move=True)
    (Path(man3["uri"]) / "model-00000.safetensors").unlink()
    assert not ArtifactStore(str(tmp_path / "store")).valid(man3)


def test_verify_rehashes_everything_and_uncommits_the_corrupt(tmp_path, pf_home, monkeypatch):
    """A change that keeps a big file's size, mtime and inode is the stat check's blind spot; `pruneflow
    verify` reads every byte, reports it, exits 1 and uncommits it so its step recomputes."""
    from typer.testing import CliRunner

    from flows.cli import app
    from tasks import store as store_mod

    url = str(tmp_path / "store")
    store = ArtifactStore(url)
    man = store.put_dir(_checkpoint(tmp_path, shards=2, shard_mb=6), "checkpoint", "test", move=True)
    ok = store.put_json({"a": 1}, "metrics.json", "metrics", "test")
    store_mod._STORES.clear()
    res = CliRunner().invoke(app, ["verify", "--store", url])
    assert res.exit_code == 0 and "2 objects intact, 0 corrupt" in res.output, res.output
    _rewrite_in_place(Path(man["uri"]) / "model-00000.safetensors", keep_mtime=True)
    assert ArtifactStore(url).valid(man)  # the blind spot of the cheap check
    store_mod._STORES.clear()
    res = CliRunner().invoke(app, ["verify", "--store", url])
    assert res.exit_code == 1 and "1 objects intact, 1 corrupt" in res.output, res.output
    assert man["sha256"] in res.output and "uncommitted" in res.output
    assert not ArtifactStore(url).valid(man) and ArtifactStore(url).valid(ok)


def test_s3_download_cache_evicts_the_least_recently_used(s3_env, tmp_path, pf_home, monkeypatch):
    cache = tmp_path / "cache"
    store = ArtifactStore(s3_env, cache_dir=cache)
    mans = []
    for i in range(3):
        f = tmp_path / f"obj{i}.bin"
        f.write_bytes(os.urandom(1000))
        mans.append(store.put_file(f, "stats", "test"))
    a, b, c = mans
    monkeypatch.setenv("PRUNEFLOW_S3_CACHE_GB", str(2500 / 1e9))  # room for two copies
    for m in (a, b):
        assert ArtifactStore(s3_env, cache_dir=cache).local_path(m).exists()
    side = {m["sha256"]: cache / f"{m['sha256']}.files.json" for m in mans}
    os.utime(side[a["sha256"]], (1_000_000, 1_000_000))  # a used long ago, b after it ...
    os.utime(side[b["sha256"]], (2_000_000, 2_000_000))
    assert ArtifactStore(s3_env, cache_dir=cache).local_path(a).exists()  # ... then a again (a reuse)
    ArtifactStore(s3_env, cache_dir=cache).local_path(c)
    assert (cache / a["sha256"]).exists() and (cache / c["sha256"]).exists()
    assert not (cache / b["sha256"]).exists() and not side[b["sha256"]].exists()
    # an evicted copy is fetched again when needed
    assert ArtifactStore(s3_env, cache_dir=cache).local_path(b).read_bytes() == (tmp_path / "obj1.bin").read_bytes()
    monkeypatch.setenv("PRUNEFLOW_S3_CACHE_GB", "lots")
    from pruning_core.errors import ConfigError

    with pytest.raises(ConfigError, match="PRUNEFLOW_S3_CACHE_GB"):
        ArtifactStore(s3_env, cache_dir=cache).evict()
