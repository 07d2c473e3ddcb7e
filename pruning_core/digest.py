"""Content digests of input files (model folders, text files), cheap to repeat.

A file enters a cache key by the sha256 of its bytes, never by its name, size or mtime. Hashing a
16 GB weight file on every cache check would read it on every run, so a digest is remembered under
`$PRUNEFLOW_HOME/cache/digests/`, keyed by the file's (real path, size, mtime_ns, ctime_ns, inode).
Any write to the file — one that keeps its size and sets its mtime back with `os.utime` included —
moves its ctime, which user space cannot set back, so the remembered digest is not found and the
bytes are hashed again. As git does for its index, a digest taken within `RACY_S` of the file's last
change is not remembered: timestamps are coarser than writes (a kernel tick), so a second write in the
same tick as the first would otherwise keep the first digest.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path

from .util import home

CHUNK = 1 << 20
RACY_S = 2.0


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_entry(path: Path, st: os.stat_result) -> Path:
    sig = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0{st.st_dev}"
    h = hashlib.sha256(sig.encode()).hexdigest()
    return home() / "cache" / "digests" / h[:2] / h


def file_digest(path: str | Path) -> str:
    """The sha256 of `path`'s bytes, hashed only when the file changed since it was last hashed."""
    path = Path(path).resolve()
    st = path.stat()
    entry = _cache_entry(path, st)
    try:
        got = entry.read_text().strip()
        if len(got) == 64:
            return got
    except OSError:
        pass
    digest = sha256_file(path)
    after = path.stat()
    changed = (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if not changed and time.time() - max(st.st_mtime, st.st_ctime) > RACY_S:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.parent / f".{entry.name}.{uuid.uuid4().hex[:8]}"
            tmp.write_text(digest)
            os.replace(tmp, entry)
        except OSError:  # a read-only home: digests are recomputed, never wrong
            pass
    return digest


def folder_files(path: str | Path) -> list[Path]:
    """Every file of a folder, recursively, sorted; hidden files and folders (`.git`, `.cache`) and
    `__pycache__` left out."""
    p = Path(path)
    return sorted(f for f in p.rglob("*") if f.is_file()
                  and not any(part.startswith(".") or part == "__pycache__" for part in f.relative_to(p).parts))


def folder_digest(path: str | Path) -> str:
    """The sha256 of a folder's sorted `relative-path NUL file-sha256 LF` lines (every file)."""
    p = Path(path)
    h = hashlib.sha256()
    for f in folder_files(p):
        h.update(f"{f.relative_to(p).as_posix()}\0{file_digest(f)}\n".encode())
    return h.hexdigest()
