"""The artifact store: content addressing, atomic commit, sha256 verification, local and S3 (moto)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pruning_core.errors import StorageError
from tasks.store import ArtifactCorrupt, ArtifactMissing, ArtifactStore, sha256_dir, sha256_file


def _dir(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text('{"a": 1}')
    (d / "sub" / "w.bin").write_bytes(bytes(range(256)) * 100)
    return d


def _roundtrip(store: ArtifactStore, tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"hello pruneflow" * 1000)
    m = store.put_file(f, "stats", "test")
    assert m["sha256"] == sha256_file(f) and m["bytes"] == f.stat().st_size
    assert set(m) >= {"uri", "sha256", "bytes", "kind", "producer"}
    assert store.local_path(m).read_bytes() == f.read_bytes()
    # content-addressed: the same bytes give the same object
    assert store.put_file(f, "stats", "other")["uri"] == m["uri"]
    d = _dir(tmp_path)
    md = store.put_dir(d, "checkpoint", "test")
    assert md["sha256"] == sha256_dir(d)[0]
    got = store.local_path(md)
    assert (got / "sub" / "w.bin").read_bytes() == (d / "sub" / "w.bin").read_bytes()
    # the step index
    store.record("score", "k1", m)
    assert store.lookup("score", "k1") == json.loads(json.dumps(m))
    assert store.lookup("score", "nope") is None


def test_local_roundtrip(tmp_path):
    _roundtrip(ArtifactStore(str(tmp_path / "store"), cache_dir=tmp_path / "cache"), tmp_path)


def test_local_corrupt_and_missing_are_detected(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc" * 100)
    m = store.put_file(f, "stats", "test")
    Path(m["uri"]).write_bytes(b"abd" * 100)  # flip bytes in place
    fresh = ArtifactStore(str(tmp_path / "store"), cache_dir=tmp_path / "cache")  # no verification memo
    with pytest.raises(ArtifactCorrupt):
        fresh.local_path(m)
    assert not fresh.valid(m)
    Path(m["uri"]).unlink()
    with pytest.raises(ArtifactMissing):
        ArtifactStore(str(tmp_path / "store")).local_path(m)


def test_uncommitted_object_is_never_read(tmp_path):
    """An object without its commit marker (a writer killed before committing) reads as missing."""
    store = ArtifactStore(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    f = tmp_path / "x.bin"
    f.write_bytes(b"data" * 10)
    m = store.put_file(f, "stats", "test")
    Path(store._marker(m["sha256"])).unlink()
    with pytest.raises(ArtifactMissing):
        ArtifactStore(str(tmp_path / "store")).local_path(m)
    # writing again repairs it
    m2 = store.put_file(f, "stats", "test")
    assert ArtifactStore(str(tmp_path / "store")).local_path(m2).read_bytes() == f.read_bytes()


def test_unwritable_local_store_is_a_storage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError, match="store.url"):
        ArtifactStore(str(blocker / "store")).check()


def test_s3_roundtrip_and_corruption(s3_env, tmp_path):
    store = ArtifactStore(s3_env, cache_dir=tmp_path / "cache")
    store.check()
    _roundtrip(store, tmp_path)
    f = tmp_path / "y.bin"
    f.write_bytes(b"s3 bytes" * 500)
    m = store.put_file(f, "scores", "test")
    assert m["uri"].startswith("s3://")
    # a damaged local copy of an intact S3 object is fetched again, not reported corrupt
    cached = store.local_path(m)
    cached.write_bytes(b"damaged")
    store._verified.clear()
    assert store.local_path(m).read_bytes() == f.read_bytes()
    store.fs.pipe_file(m["uri"], b"torn")  # overwrite the object behind the marker
    fresh = ArtifactStore(s3_env, cache_dir=tmp_path / "cache2")
    with pytest.raises(ArtifactCorrupt):
        fresh.local_path(m)
    # uncommitted: remove the marker
    store.fs.rm_file(store._marker(m["sha256"]))
    with pytest.raises(ArtifactMissing):
        ArtifactStore(s3_env, cache_dir=tmp_path / "cache3").local_path(m)


def test_s3_missing_bucket_and_credentials(s3_env, monkeypatch, tmp_path):
    bucket_url = s3_env.split("/")[2]
    with pytest.raises(StorageError, match="bucket"):
        ArtifactStore(f"s3://{bucket_url}-missing/x").check()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="credentials"):
        ArtifactStore(s3_env).check()


def test_unreachable_s3_endpoint(monkeypatch):
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match="reachable"):
        ArtifactStore("s3://nowhere/prefix").check()
