"""Small jobs every layer needs once: where pruneflow keeps its files, the code's git revision,
reading a number that may be missing or not finite, and writing a folder atomically."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def home() -> Path:
    """`$PRUNEFLOW_HOME`, default `~/.cache/pruneflow`: models, artifacts, runs, caches, MLflow."""
    return Path(os.environ.get("PRUNEFLOW_HOME", "~/.cache/pruneflow")).expanduser()


def git_revision(root: str | os.PathLike = REPO) -> str | None:
    """The commit checked out at `root` (default: this code's checkout), or None outside git."""
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def finite_float(v: Any) -> float | None:
    """`v` as a float when it is a finite number (or a string of one); None for None, booleans,
    NaN, infinities and anything else."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def replace_dir(tmp: Path, path: Path) -> None:
    """Put the finished folder `tmp` at `path`, replacing what is there with two renames (readers see
    the old folder or the new one, never a half-written one). A kill between the renames leaves only
    `.name.old-PID`: `recover_dir` (called here and by readers) renames it back."""
    recover_dir(path)
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _gone(pid: int) -> bool:
    """Has process `pid` of this host ended? (Another user's live process counts as running.)"""
    try:
        os.kill(pid, 0)
        return False
    except ProcessLookupError:
        return True
    except OSError:
        return False


def recover_dir(path: Path) -> bool:
    """Undo a kill inside `replace_dir`: with `path` missing, the newest `.name.old-PID` of a dead process
    goes back to `path`; such leftovers beside an existing `path` are removed. True when restored."""
    path = Path(path)
    try:
        olds = [p for p in path.parent.glob(f".{path.name}.old-*")
                if p.name.rsplit("-", 1)[-1].isdigit() and _gone(int(p.name.rsplit("-", 1)[-1]))]
    except OSError:
        return False
    olds.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    restored = False
    if olds and not path.exists() and not path.is_symlink():
        try:
            os.replace(olds.pop(0), path)
            restored = True
        except OSError:
            return False
    for p in olds:
        shutil.rmtree(p, ignore_errors=True)
    return restored


@contextlib.contextmanager
def staged_dir(path: Path, field: str = "output") -> Iterator[Path]:
    """`with staged_dir(path) as tmp:` write into `tmp` (beside `path`) and end with `replace_dir(tmp,
    path)`. An unwritable place or any OSError on the way is one StorageError naming `field`; the
    temporary folder never outlives the block (nothing half-written is left at `path`)."""
    from .errors import StorageError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(field, str(path), "a folder whose parent can be created and written", str(e)) from None
    if not os.access(path.parent, os.W_OK):
        raise StorageError(field, str(path), "a writable folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except OSError as e:
        raise StorageError(field, str(path), "a writable folder", str(e)) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
