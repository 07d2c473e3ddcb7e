"""Small jobs every layer needs once: where pruneflow keeps its files, the code's git revision, and
reading a number that may be missing or not finite."""

from __future__ import annotations

import math
import os
import subprocess
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
