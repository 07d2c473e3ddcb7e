"""The artifact store: content-addressed, atomic, verified. fsspec over a local folder or `s3://`.

Layout under the store's root (a local folder, default `$PRUNEFLOW_HOME/artifacts`, or
`s3://bucket/prefix`)::

    objects/<sha[:2]>/<sha>/<name>      a file artifact (stats, scores, calibration tokens, report)
    objects/<sha[:2]>/<sha>/            a directory artifact (a checkpoint folder)
    objects/<sha[:2]>/<sha>.commit      the commit marker: the manifest, written *last*
    index/<step>/<key>.json             step cache: the manifest a step produced for a cache key

The sha256 of a file is the sha256 of its bytes; of a folder, the sha256 of its sorted
`relative-path NUL file-sha256 LF` lines. Artifacts are produced in a local temporary place, hashed,
then copied in: locally into a temporary folder renamed into place, on S3 object by object under the
final key. Either way the commit marker goes last, and readers trust only committed objects, so a
process killed mid-write leaves nothing that any reader uses. Every read verifies the sha256; a
missing, uncommitted or corrupt object reads as `ArtifactMissing` / `ArtifactCorrupt`, which the
step cache turns into "recompute, with a warning".

A manifest is a small dict: `{uri, sha256, bytes, kind, producer}` (+ `name`, `dir`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from pruning_core.digest import sha256_file
from pruning_core.errors import StorageError

from . import journal

log = logging.getLogger("pruneflow.store")

CHUNK = 1 << 20
TMP_PREFIX = ".tmp-"


def env_int(name: str, default: int, least: int = 1) -> int:
    """An integer setting from the environment; a ConfigError naming the variable otherwise (one line)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        v = int(raw)
    except ValueError:
        v = None
    if v is None or v < least:
        from pruning_core.errors import ConfigError

        raise ConfigError(name, raw, f"a whole number >= {least}")
    return v


S3_TIMEOUT_S = env_int("PRUNEFLOW_S3_TIMEOUT", 20)
LOCK_TTL_S = 60.0
# files larger than one part go up as S3 multipart uploads (parts of at least 5 MiB)
S3_PART_BYTES = max(5, env_int("PRUNEFLOW_S3_PART_MB", 50)) << 20


class ArtifactMissing(StorageError):
    """The object is not in the store, or was never committed."""


class ArtifactCorrupt(StorageError):
    """The object's bytes do not match its sha256."""


class TransientStorageError(StorageError):
    """A network / storage hiccup worth retrying (never used for user errors)."""


pruneflow_home = journal.pruneflow_home


def default_store_url() -> str:
    return str(pruneflow_home() / "artifacts")


# -- hashing ---------------------------------------------------------------------------------------
def _dir_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def file_digests(path: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file of a folder."""
    path = Path(path)
    return {f.relative_to(path).as_posix(): sha256_file(f) for f in _dir_files(path)}


def _combine(digests: dict[str, str]) -> str:
    h = hashlib.sha256()
    for rel, d in sorted(digests.items()):
        h.update(f"{rel}\0{d}\n".encode())
    return h.hexdigest()


def sha256_dir(path: str | Path) -> tuple[str, int]:
    """(digest, total bytes) of a folder: hash of its sorted (relative path, file sha256) lines."""
    path = Path(path)
    return _combine(file_digests(path)), sum(f.stat().st_size for f in _dir_files(path))


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# -- the store -------------------------------------------------------------------------------------
TIMEOUTS = {"ConnectTimeoutError", "ReadTimeoutError", "TimeoutError", "FSTimeoutError", "timeout"}


def _is_timeout(exc: BaseException) -> bool:
    return bool({type(e).__name__ for e in _chain(exc)} & TIMEOUTS)


def _is_transient(exc: BaseException) -> bool:
    """A dropped connection is worth another try; an endpoint that does not answer in time is not."""
    if _is_timeout(exc):
        return False
    names = {type(e).__name__ for e in _chain(exc)}
    transient = {
        "EndpointConnectionError", "ConnectionClosedError", "ClientConnectorError", "ServerDisconnectedError",
        "ClientOSError", "ConnectionError", "ConnectionResetError", "ConnectionRefusedError", "ProxyConnectionError",
    }
    return bool(names & transient)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _is_no_credentials(exc: BaseException) -> bool:
    names = {type(e).__name__ for e in _chain(exc)}
    if names & {"NoCredentialsError", "PartialCredentialsError"}:
        return True
    return any("InvalidAccessKeyId" in str(e) or "SignatureDoesNotMatch" in str(e) for e in _chain(exc))


class ArtifactStore:
    """A content-addressed store at `url` (local folder or s3://bucket/prefix)."""

    def __init__(self, url: str | None = None, cache_dir: str | Path | None = None):
        url = url or default_store_url()
        self.url = url
        self.remote = "://" in url and not url.startswith("file://")
        if self.remote:
            import fsspec

            protocol = url.split("://", 1)[0]
            if protocol not in ("s3", "memory"):
                raise StorageError("store.url", url, "a local folder or s3://bucket/prefix")
            kwargs: dict[str, Any] = {}
            if protocol == "s3":
                # every call answers within S3_TIMEOUT_S or fails: botocore's timeouts, no retry of its own,
                # one attempt in s3fs (a frozen endpoint ends the run with one line instead of hanging)
                kwargs = {
                    "config_kwargs": {"connect_timeout": S3_TIMEOUT_S, "read_timeout": S3_TIMEOUT_S,
                                      "retries": {"total_max_attempts": 1}},
                    "skip_instance_cache": True,
                }
                ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                if ep:
                    kwargs["client_kwargs"] = {"endpoint_url": ep}
            self.fs = fsspec.filesystem(protocol, **kwargs)
            if protocol == "s3":
                self.fs.retries = 1
            self.root = url.rstrip("/")
        else:
            import fsspec

            self.fs = fsspec.filesystem("file")
            self.root = str(Path(url.removeprefix("file://")).expanduser().resolve())
        cache = Path(cache_dir) if cache_dir else pruneflow_home() / "cache" / "store"
        self.cache = cache
        self._verified: set[tuple[str, str]] = set()
        self._handed: set[str] = set()  # downloaded copies this process returned (never evicted under it)
        self._lock = threading.Lock()

    # -- paths -------------------------------------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _obj(self, sha: str) -> str:
        return self._join("objects", sha[:2], sha)

    def _marker(self, sha: str) -> str:
        return self._obj(sha) + ".commit"

    def _wrap(self, exc: Exception, what: str) -> StorageError:
        if isinstance(exc, StorageError):
            return exc
        if _is_no_credentials(exc):
            return StorageError(
                "store.url", self.url,
                "an S3 store with credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS profile)",
            )
        if _is_timeout(exc):
            return StorageError("store.url", self.url, f"a store that answers within {S3_TIMEOUT_S} s ({what} timed out)")
        if _is_transient(exc):
            return TransientStorageError("store.url", self.url, f"a reachable store ({what}: {type(exc).__name__})")
        if isinstance(exc, PermissionError):
            return StorageError("store.url", self.url, f"a writable store ({what}: permission denied)")
        msg = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        return StorageError("store.url", self.url, f"a usable store ({what}: {msg})")

    # -- checks ------------------------------------------------------------------------------------
    def check(self) -> None:
        """Fail fast (StorageError) when the store can't be reached or written."""
        try:
            if self.remote:
                bucket = self.root.split("://", 1)[1].split("/", 1)[0]
                if self.url.startswith("s3://"):
                    _require_credentials(self.url)
                    self.fs.ls(bucket)  # raises on missing bucket / credentials / endpoint
                probe = self._join("tmp", f"probe-{uuid.uuid4().hex}")
                self.fs.pipe_file(probe, b"ok")
                self.fs.rm_file(probe)
            else:
                Path(self.root).mkdir(parents=True, exist_ok=True)
                probe = Path(self.root) / f".probe-{uuid.uuid4().hex}"
                probe.write_bytes(b"ok")
                probe.unlink()
        except FileNotFoundError as e:
            raise StorageError("store.url", self.url, "an existing bucket (create it first)") from e
        except Exception as e:  # noqa: BLE001 - translated to one user-facing line
            raise self._wrap(e, "check") from e

    # -- writes ------------------------------------------------------------------------------------
    def put_file(self, local: str | Path, kind: str, producer: str, name: str | None = None) -> dict:
        local = Path(local)
        sha = sha256_file(local)
        man = {"uri": "", "sha256": sha, "bytes": local.stat().st_size, "kind": kind, "producer": producer,
               "name": name or local.name, "dir": False}
        man["uri"] = self._obj(sha) + "/" + man["name"]
        return self._commit(man, lambda dst: self._copy_in([(local, man["name"])], dst), {man["name"]: sha})

    def put_dir(self, local: str | Path, kind: str, producer: str, move: bool = False) -> dict:
        """Commit a folder. `move`: the caller gives the files up (a local store renames them
        instead of copying: a checkpoint larger than the free disk is never held twice)."""
        local = Path(local)
        digests = file_digests(local)
        sha, total = _combine(digests), sum(f.stat().st_size for f in _dir_files(local))
        man = {"uri": self._obj(sha), "sha256": sha, "bytes": total, "kind": kind, "producer": producer,
               "name": local.name, "dir": True}
        files = [(f, f.relative_to(local).as_posix()) for f in _dir_files(local)]
        return self._commit(man, lambda dst: self._copy_in(files, dst, move=move), digests)

    def put_bytes(self, data: bytes, name: str, kind: str, producer: str) -> dict:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_bytes(data)
            return self.put_file(p, kind, producer, name=name)

    def put_json(self, obj: Any, name: str, kind: str, producer: str) -> dict:
        return self.put_bytes(json.dumps(obj, indent=1, sort_keys=True, default=str).encode(), name, kind, producer)

    def _copy_in(self, files: list[tuple[Path, str]], dst: str, move: bool = False) -> None:
        for src, rel in files:
            target = f"{dst}/{rel}"
            if self.remote:
                # a kill mid-upload leaves an incomplete multipart upload: the process journal names its
                # key, so that the watchdog of this run (or the next run) aborts it
                with journal.uploading(self.url, target):
                    self.fs.put_file(str(src), target, chunksize=S3_PART_BYTES)
            else:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                if move:
                    try:
                        os.replace(src, target)
                        continue
                    except OSError:  # another filesystem: copy
                        pass
                shutil.copyfile(src, target)

    def _commit(self, man: dict, copy, digests: dict[str, str] | None = None) -> dict:
        sha = man["sha256"]
        try:
            if self.committed(sha):
                return man  # the same content is committed already (maybe by another producer): same URI
            if self.remote:
                # a kill before the marker leaves objects no reader uses: the journal names them, so that
                # the watchdog (or the next run) deletes them (`drop_uncommitted`)
                with journal.committing(self.url, sha):
                    copy(self._obj(sha))  # objects first, under the final key ...
                    fault_point(f"commit:{man['kind']}")
                    # ... the marker last; it lists each object's size and ETag, so that a cache check
                    # decides from one LIST without downloading anything
                    marker = {**man, "files": self._listing(sha)}
                    self.fs.pipe_file(self._marker(sha), json.dumps(marker).encode())
            else:
                final = Path(self._obj(sha))
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = final.parent / f"{TMP_PREFIX}{sha[:12]}-{journal.owner_tag()}-{uuid.uuid4().hex[:8]}"
                try:
                    copy(str(tmp))
                    fault_point(f"commit:{man['kind']}")
                    # rename + marker under the object's lock: an uncommitted `final` seen here is a dead
                    # writer's leftover, never a live writer's object between its rename and its marker
                    with self.lock(f"objects-{sha[:2]}"):
                        if not self.committed(sha):
                            if final.exists():
                                shutil.rmtree(final, ignore_errors=True)
                            os.replace(tmp, final)
                            # the marker lists each file's size, digest and stat signature: a cache check
                            # trusts it (`_check_local`) instead of reading every byte again
                            _atomic_write(Path(self._marker(sha)),
                                          json.dumps({**man, "files": _stat_listing(final, digests)}).encode())
                finally:
                    if tmp.exists():  # committed meanwhile by another writer: ours is not needed
                        shutil.rmtree(tmp, ignore_errors=True)
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, "write") from e
        return man

    def drop_uncommitted(self, sha: str) -> bool:
        """Delete the objects of `sha` unless committed (what a writer killed before its marker left on
        S3); True when something was deleted."""
        try:
            if self.committed(sha) or not self.fs.exists(self._obj(sha)):
                return False
            self.fs.rm(self._obj(sha), recursive=True)
            return True
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, "clean-up") from e

    def _listing(self, sha: str) -> dict[str, list]:
        """{relative path: [size, etag]} of an object's files on S3 (one LIST, no GET)."""
        src = self._obj(sha)
        base = src.split("://", 1)[-1]
        out = {}
        for f, info in self.fs.find(src, detail=True).items():
            rel = f.split("://", 1)[-1][len(base) + 1:]
            out[rel] = [int(info.get("size") or 0), str(info.get("ETag") or "").strip('"')]
        return dict(sorted(out.items()))

    # -- reads -------------------------------------------------------------------------------------
    def committed(self, sha: str) -> bool:
        try:
            return self.fs.exists(self._marker(sha))
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, "read") from e

    def verify(self, man: dict) -> None:
        """Raise ArtifactMissing / ArtifactCorrupt unless `man`'s object is committed and every byte of it
        hashes to its sha256 (a full re-hash: `pruneflow verify`; cache checks use `valid`)."""
        if not self.committed(man["sha256"]):
            raise ArtifactMissing(man.get("kind", "artifact"), man.get("uri"), "a committed object in the store")
        if self.remote:
            self._check_listing(man)
            dst = self.cache / man["sha256"]
            if dst.exists():  # the downloaded copy too
                self._full_check(man, dst if man.get("dir") else dst / man["name"])
            return
        self._full_check(man, Path(man["uri"]))

    def valid(self, man: dict) -> bool:
        """Is `man`'s object committed and intact? Nothing is downloaded and no large file is read: locally
        the commit marker's listing (sizes, digests, stat signatures) is checked against the files
        (`_check_local`); on S3 the marker's sizes and ETags against a fresh LIST of the object."""
        try:
            if self.remote:
                self._check_listing(man)
            else:
                self._check_local(man)
            return True
        except (ArtifactMissing, ArtifactCorrupt) as e:
            log.warning("artifact %s (%s): %s; its step will recompute", man.get("kind"), man.get("uri"), e)
            return False

    def _full_check(self, man: dict, path: Path) -> None:
        what = man.get("kind", "artifact"), man.get("uri")
        try:
            got = sha256_dir(path)[0] if man.get("dir") else sha256_file(path)
        except FileNotFoundError as e:
            raise ArtifactMissing(*what, "an object present in the store") from e
        if got != man["sha256"]:
            raise ArtifactCorrupt(*what, f"bytes with sha256 {man['sha256'][:12]}… (got {got[:12]}…)")

    def _check_local(self, man: dict) -> None:
        """A local object against its commit marker: every file present with its committed size; a file
        is hashed again only when it is small or its stat signature (mtime, inode) moved since the commit.
        A marker without a listing (an older store) means one full re-hash per process."""
        sha = man["sha256"]
        what = man.get("kind", "artifact"), man.get("uri")
        try:
            rec = json.loads(Path(self._marker(sha)).read_bytes())
        except FileNotFoundError:
            raise ArtifactMissing(*what, "a committed object in the store") from None
        except ValueError:
            raise ArtifactCorrupt(*what, "a readable commit marker") from None
        if rec.get("files") is None:
            if (self.url, sha) not in self._verified:
                self._full_check(man, Path(man["uri"]))
                with self._lock:
                    self._verified.add((self.url, sha))
            return
        key = (self.url, sha)
        # small files are hashed on the first check in this process; later checks compare stat signatures
        _check_stat_listing(Path(self._obj(sha)), rec["files"], what, rehash_small=key not in self._verified)
        with self._lock:
            self._verified.add(key)

    def _check_listing(self, man: dict) -> None:
        sha = man["sha256"]
        what = man.get("kind", "artifact"), man.get("uri")
        try:
            if not self.fs.exists(self._marker(sha)):
                raise ArtifactMissing(*what, "a committed object in the store")
            files = json.loads(self.fs.cat_file(self._marker(sha))).get("files")
            if files is None:  # committed before markers listed their files: verify the bytes
                self.verify(man)
                return
            now = self._listing(sha)
        except StorageError:
            raise
        except json.JSONDecodeError:
            raise ArtifactCorrupt(*what, "a readable commit marker") from None
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, "read") from e
        if now != files:
            raise ArtifactCorrupt(*what, "objects whose sizes and ETags match the commit marker")

    def local_path(self, man: dict) -> Path:
        """A checked local path of the artifact: the object itself when local (`_check_local`), else a copy
        in the download cache, hashed when downloaded and checked against its listing when reused.
        The cache keeps at most `PRUNEFLOW_S3_CACHE_GB` (least recently used copies go first)."""
        sha = man["sha256"]
        if not self.committed(sha):
            raise ArtifactMissing(man.get("kind", "artifact"), man.get("uri"), "a committed object in the store")
        if not self.remote:
            self._check_local(man)
            return Path(man["uri"])
        dst = self.cache / sha
        path = dst if man.get("dir") else dst / man["name"]
        with self._lock:
            self._handed.add(sha)
        if dst.exists() and self._cached_copy_ok(man, dst):
            return path
        shutil.rmtree(dst, ignore_errors=True)
        self._download(man, dst)
        if not self._cached_copy_ok(man, dst):
            shutil.rmtree(dst, ignore_errors=True)
            self._sidecar(sha).unlink(missing_ok=True)
            raise ArtifactCorrupt(man.get("kind", "artifact"), man.get("uri"), f"bytes with sha256 {sha[:12]}…")
        self.evict()
        return path

    def _sidecar(self, sha: str) -> Path:
        return self.cache / f"{sha}.files.json"

    def _cached_copy_ok(self, man: dict, dst: Path) -> bool:
        """Is the downloaded copy `dst` intact? Its listing (written when it was hashed) is checked like a
        local object's; a copy without one is hashed in full. Its use time is recorded for eviction."""
        side = self._sidecar(man["sha256"])
        try:
            files = json.loads(side.read_text())
        except (OSError, ValueError):
            files = None
        try:
            if files is None:
                digests = file_digests(dst)
                got = _combine(digests) if man.get("dir") else digests.get(man["name"])
                if got != man["sha256"]:
                    return False
                _atomic_write(side, json.dumps(_stat_listing(dst, digests)).encode())
            else:
                _check_stat_listing(dst, files, (man.get("kind", "artifact"), man.get("uri")))
                os.utime(side)  # last use, for the least-recently-used eviction
        except (StorageError, OSError):
            return False
        return True

    def evict(self, limit: int | None = None) -> list[str]:
        """Remove the least recently used downloaded copies until the cache holds at most `limit` bytes
        (default `PRUNEFLOW_S3_CACHE_GB`); copies this process has handed out are kept."""
        limit = cache_limit_bytes() if limit is None else limit
        entries = []
        for side in self.cache.glob("*.files.json"):
            try:
                size = sum(int(v[0]) for v in json.loads(side.read_text()).values())
                entries.append((side.stat().st_mtime, side.name.removesuffix(".files.json"), size, side))
            except (OSError, ValueError, TypeError, IndexError):
                continue
        total = sum(e[2] for e in entries)
        gone = []
        for _used, sha, size, side in sorted(entries):
            if total <= limit:
                break
            if sha in self._handed:
                continue
            side.unlink(missing_ok=True)  # first: a reader without it hashes or fetches again
            shutil.rmtree(self.cache / sha, ignore_errors=True)
            total -= size
            gone.append(sha)
        if gone:
            log.info("download cache: evicted %d copies (limit %.1f GB)", len(gone), limit / 1e9)
        return gone

    def verify_all(self, uncommit: bool = True) -> dict[str, list[str]]:
        """Re-hash every committed object (`pruneflow verify`). A corrupt or incomplete one is uncommitted
        (its marker removed, when `uncommit`) so that the step that made it recomputes."""
        out: dict[str, list[str]] = {"ok": [], "corrupt": []}
        try:
            markers = sorted(self.fs.glob(self._join("objects", "*", "*.commit")))
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, "read") from e
        for mk in markers:
            try:
                man = json.loads(self.fs.cat_file(mk))
                man.pop("files", None)
                self.verify(man)
                out["ok"].append(man["uri"])
            except (ArtifactMissing, ArtifactCorrupt, ValueError, KeyError) as e:
                out["corrupt"].append(f"{mk.removesuffix('.commit')}: {e}")
                if uncommit:
                    self.fs.rm_file(mk)
        return out

    def _download(self, man: dict, dst: Path) -> None:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".dl-{journal.owner_tag()}-{uuid.uuid4().hex[:8]}"
        try:
            src = self._obj(man["sha256"])
            files = [f for f in self.fs.find(src) if not f.endswith(".commit")]
            if not files:
                raise ArtifactMissing(man.get("kind", "artifact"), man.get("uri"), "an object present in the store")
            base = src.split("://", 1)[-1]
            for f in files:
                rel = f.split("://", 1)[-1][len(base) + 1:]
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(f, str(target))
            if dst.exists():
                shutil.rmtree(dst, ignore_errors=True)
            os.replace(tmp, dst)
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, "read") from e
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def read_bytes(self, man: dict) -> bytes:
        return self.local_path(man).read_bytes()

    def read_json(self, man: dict) -> Any:
        return json.loads(self.read_bytes(man))

    # -- step cache index --------------------------------------------------------------------------
    def _index(self, step: str, key: str) -> str:
        return self._join("index", step, f"{key}.json")

    def lookup(self, step: str, key: str) -> dict | None:
        """The manifest recorded for (step, key), or None. Not verified: call `valid` on it."""
        path = self._index(step, key)
        try:
            if not self.fs.exists(path):
                return None
            rec = json.loads(self.fs.cat_file(path))
        except json.JSONDecodeError:
            log.warning("cache record %s is unreadable; recomputing", path)
            return None
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, "read") from e
        rec.pop("key_parts", None)
        return rec

    def record(self, step: str, key: str, manifest: dict, key_parts: dict | None = None) -> None:
        """Record `manifest` for (step, key); `key_parts` (what the key was made of) explains later misses."""
        data = json.dumps({**manifest, "key_parts": key_parts}, sort_keys=True, default=str).encode()
        path = self._index(step, key)
        try:
            if self.remote:
                self.fs.pipe_file(path, data)  # one PUT: atomic on S3
            else:
                _atomic_write(Path(path), data)
        except Exception as e:  # noqa: BLE001
            raise self._wrap(e, "write") from e

    def history(self, step: str, n: int = 20) -> list[dict]:
        """The key parts of the `n` newest records of `step` (to say why a key missed)."""
        try:
            entries = self.fs.ls(self._join("index", step), detail=True)
        except FileNotFoundError:
            return []
        except Exception as e:  # noqa: BLE001
            log.warning("cache history of %s unreadable (%s)", step, type(e).__name__)
            return []
        files = [e for e in entries if e.get("type") == "file" and e["name"].endswith(".json")]
        files.sort(key=lambda e: _mtime(e), reverse=True)
        out = []
        for e in files[:n]:
            try:
                parts = json.loads(self.fs.cat_file(e["name"])).get("key_parts")
            except Exception:  # noqa: BLE001 - an unreadable old record explains nothing
                continue
            if parts:
                out.append(parts)
        return out

    # -- locks -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str, wait_message: str | None = None):
        """Hold the store-wide lock `name` (one holder across processes and workers).

        Local: an flock on `<root>/locks/<name>.lock` (released by the kernel if the holder dies).
        S3: a lease object `locks/<name>.json` created only if absent (conditional PUT), renewed by a
        heartbeat while held; a lease whose holder stopped renewing it expires after LOCK_TTL_S."""
        if self.remote:
            with self._s3_lock(name, wait_message):
                yield
            return
        path = Path(self.root) / "locks" / f"{name}.lock"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise self._wrap(e, "lock") from e
        try:
            told = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if wait_message and not told:
                        log.info(wait_message)
                        told = True
                    time.sleep(0.2)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _lease_put(self, path: str, data: bytes, if_match: str | None) -> str | None:
        """Write a lease: created only if absent (`if_match` None), else only over the version whose
        ETag is `if_match` (a compare-and-swap). Its new ETag, or None when the condition failed."""
        try:
            if not self.url.startswith("s3://"):  # memory:// (tests): no ETags, create-only
                if if_match is not None:
                    self.fs.pipe_file(path, data)
                else:
                    self.fs.pipe_file(path, data, mode="create")
                return "-"
            bucket, _, key = path.split("://", 1)[1].partition("/")
            cond = {"IfMatch": if_match} if if_match is not None else {"IfNoneMatch": "*"}
            return self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **cond).get("ETag", "-")
        except Exception as e:  # noqa: BLE001
            if _precondition_failed(e):
                return None
            raise self._wrap(e, "lock") from e

    def _lease_get(self, path: str) -> tuple[dict, str | None] | None:
        """(lease, its ETag) or None when there is none."""
        try:
            if not self.url.startswith("s3://"):  # memory:// (tests): no ETags, takeover by overwriting
                return json.loads(self.fs.cat_file(path)), "-"
            from fsspec.asyn import sync

            bucket, _, key = path.split("://", 1)[1].partition("/")

            async def get():  # one GET: the content and the ETag of the same version
                resp = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
                async with resp["Body"] as body:
                    return await body.read(), resp.get("ETag")

            data, etag = sync(self.fs.loop, get)
            return json.loads(data), etag
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return {}, None  # being written: look again

    @contextlib.contextmanager
    def _s3_lock(self, name: str, wait_message: str | None):
        path = self._join("locks", f"{name}.json")
        me = f"{journal.owner_tag()}-{uuid.uuid4().hex[:8]}"
        told = False

        def lease() -> bytes:
            return json.dumps({"owner": me, "expires": time.time() + LOCK_TTL_S}).encode()

        while True:
            etag = self._lease_put(path, lease(), None)  # If-None-Match: *
            if etag is not None:
                break
            try:
                got = self._lease_get(path)
            except Exception:  # noqa: BLE001 - a lease being replaced: look again
                got = ({}, None)
            if got is None:
                continue  # released meanwhile
            held, held_etag = got
            if held.get("expires", float("inf")) < time.time() and held_etag is not None:
                # take over the expired lease *as it was read* (If-Match its ETag): of several waiters
                # that saw it expire, exactly one wins; the others find a live lease and wait
                log.warning("lock %s: the holder (%s) stopped renewing it; taking it over", name, held.get("owner"))
                etag = self._lease_put(path, lease(), held_etag)
                if etag is not None:
                    break
                continue
            if wait_message and not told:
                log.info(wait_message)
                told = True
            time.sleep(1.0)
        stop = threading.Event()
        mine = {"etag": etag}

        def renew():
            while not stop.wait(LOCK_TTL_S / 3):
                try:
                    new = self._lease_put(path, lease(), mine["etag"])
                except Exception as e:  # noqa: BLE001
                    log.warning("lock %s: renewing the lease failed (%s)", name, type(e).__name__)
                    continue
                if new is None:  # taken over after we failed to renew in time: not ours any more
                    log.warning("lock %s: the lease was taken over by another run", name)
                    return
                mine["etag"] = new

        t = threading.Thread(target=renew, daemon=True, name=f"lease-{name[:20]}")
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join(timeout=5)
            try:
                if json.loads(self.fs.cat_file(path)).get("owner") == me:
                    self.fs.rm_file(path)
            except Exception:  # noqa: BLE001 - an expired lease is harmless
                pass

    # -- clean-up ----------------------------------------------------------------------------------
    def abort_uploads(self, keys: list[str]) -> int:
        """Abort the incomplete S3 multipart uploads of `keys` (full s3:// paths); how many were open."""
        if not self.remote or not self.url.startswith("s3://"):
            return 0
        n = 0
        for key in keys:
            bucket, _, path = key.split("://", 1)[-1].partition("/")
            try:
                resp = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=path)
                for up in resp.get("Uploads", []):
                    if up.get("Key") == path:
                        self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=path, UploadId=up["UploadId"])
                        n += 1
            except Exception as e:  # noqa: BLE001
                raise self._wrap(e, "abort upload") from e
        return n

    def reclaim(self) -> list[str]:
        """Remove what killed writers left: temporary object folders of dead processes on this host
        (or older than a day, from any host) and partial downloads in the local cache."""
        gone: list[str] = []
        if not self.remote:
            for tmp in Path(self.root).glob(f"objects/*/{TMP_PREFIX}*"):
                if journal.owner_is_dead(tmp.name.removeprefix(TMP_PREFIX).split("-", 1)[-1], tmp):
                    shutil.rmtree(tmp, ignore_errors=True)
                    gone.append(str(tmp))
        for tmp in self.cache.glob(".dl-*"):
            if journal.owner_is_dead(tmp.name.removeprefix(".dl-"), tmp):
                shutil.rmtree(tmp, ignore_errors=True)
                gone.append(str(tmp))
        return gone


def _precondition_failed(exc: BaseException) -> bool:
    """A conditional S3 write refused (412 PreconditionFailed; s3fs: FileExistsError for If-None-Match)."""
    return any(isinstance(e, FileExistsError) or "PreconditionFailed" in repr(e) or "pre-condition" in str(e)
               or "412" in str(e) for e in _chain(exc))


SMALL_BYTES = 4 << 20  # files up to this size are hashed on every check (cheap; the stat check has a tick's blind spot)


def cache_limit_bytes() -> int:
    """`PRUNEFLOW_S3_CACHE_GB` (default 100): the most the S3 download cache keeps."""
    from pruning_core.errors import ConfigError

    raw = os.environ.get("PRUNEFLOW_S3_CACHE_GB", "100")
    try:
        gb = float(raw)
    except ValueError:
        gb = -1.0
    if not gb >= 0:
        raise ConfigError("PRUNEFLOW_S3_CACHE_GB", raw, "a number of gigabytes >= 0")
    return int(gb * 1e9)


def _stat_listing(root: Path, digests: dict[str, str] | None) -> dict[str, list]:
    """{relative path: [size, sha256, mtime_ns, inode]} of the files under `root`."""
    if digests is None:
        digests = file_digests(root)
    out = {}
    for rel, d in sorted(digests.items()):
        st = (root / rel).stat()
        out[rel] = [st.st_size, d, st.st_mtime_ns, st.st_ino]
    return out


def _check_stat_listing(root: Path, files: dict[str, list], what: tuple, rehash_small: bool = True) -> None:
    """Raise unless the files under `root` are the listed ones with the listed sizes; a file is hashed
    again when its mtime or inode moved since it was listed, or it is small (<= SMALL_BYTES, when
    `rehash_small`)."""
    present = {f.relative_to(root).as_posix() for f in _dir_files(root)} if root.is_dir() else set()
    if set(files) - present:
        raise ArtifactMissing(*what, "an object with all its files present")
    if present - set(files):
        raise ArtifactCorrupt(*what, "an object holding only the files it was committed with")
    for rel, (size, digest, mtime_ns, ino) in files.items():
        f = root / rel
        st = f.stat()
        if st.st_size != size:
            raise ArtifactCorrupt(*what, f"{rel} of {size} bytes (found {st.st_size})")
        small = rehash_small and size <= SMALL_BYTES
        if (small or (st.st_mtime_ns, st.st_ino) != (mtime_ns, ino)) and sha256_file(f) != digest:
            raise ArtifactCorrupt(*what, f"{rel} with sha256 {digest[:12]}…")


def _mtime(entry: dict) -> float:
    t = entry.get("mtime") or entry.get("LastModified") or entry.get("created") or 0
    return t.timestamp() if hasattr(t, "timestamp") else float(t)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _require_credentials(url: str) -> None:
    """s3fs silently falls back to anonymous access; a store that writes needs real credentials."""
    import botocore.session

    if os.environ.get("PRUNEFLOW_S3_ANON") == "1":
        return
    if botocore.session.Session().get_credentials() is None:
        raise StorageError(
            "store.url", url,
            "an S3 store with credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS profile)",
        )


def fault_point(name: str) -> None:
    """Test hook for crash tests: with PRUNEFLOW_FAULT=<name>, announce (PRUNEFLOW_FAULT_FILE) and hang
    here so the test can SIGKILL the process mid-write. Inert unless both variables are set."""
    if os.environ.get("PRUNEFLOW_FAULT") == name and os.environ.get("PRUNEFLOW_FAULT_FILE"):
        Path(os.environ["PRUNEFLOW_FAULT_FILE"]).write_text(str(os.getpid()))
        time.sleep(600)


_STORES: dict[str, ArtifactStore] = {}


def open_store(url: str | None = None) -> ArtifactStore:
    """A (process-wide, cached) store for `url`; None means the local default."""
    url = url or default_store_url()
    if url not in _STORES:
        _STORES[url] = ArtifactStore(url)
    return _STORES[url]
