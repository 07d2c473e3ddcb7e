"""A per-process journal of what a run would leave behind if it were killed, and who owns a leftover.

Each process that runs a flow keeps `$PRUNEFLOW_HOME/proc/<owner>.json`: the Prefect flow runs it is
executing, the pid of the temporary Prefect server it started, the stores it writes to, the S3 keys it
is uploading, and the signal that stopped it (`tasks.signals`). A clean exit empties it. When the
process dies (SIGKILL, OOM killer, a signal), its watchdog, or else the next run, reads it and cleans
up (`tasks.cleanup`). Temporary files and folders carry the owner's tag in
their names (`<pid>.<host digest>`), so a leftover can be told apart from a live writer's: scratch
folders `pruneflow-<tag>-*` and disk-placement spills `pruneflow-spill-<tag>-*` (named by
`pruning_core.weightfiles`) in `$PRUNEFLOW_SCRATCH` and `$TMPDIR`, store temporaries `.tmp-<sha>-<tag>-*`.

Standard library only: the watchdog imports this module and nothing heavy.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

STALE_S = 24 * 3600.0  # a leftover of another host is reclaimed after a day
UNTAGGED_STALE_S = 3600.0  # one without an owner tag (older releases) after an hour
_TAG = re.compile(r"(\d+)\.([0-9a-f]{8})")
_lock = threading.Lock()


KEEP_PIDS: set[int] = set()  # children that outlive this process on purpose (its watchdog): signals spare them

def pruneflow_home() -> Path:
    """All local state of pruneflow lives here (`$PRUNEFLOW_HOME`, default ~/.cache/pruneflow)."""
    return Path(os.environ.get("PRUNEFLOW_HOME", "~/.cache/pruneflow")).expanduser()


def host_id() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def owner_tag(pid: int | None = None) -> str:
    return f"{pid or os.getpid()}.{host_id()}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is dead for our purposes
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def owner_is_dead(name: str, path: Path | None = None) -> bool:
    """Is the writer that named a temporary file `name` gone? Same host: its pid is not alive.
    Another host, or no tag in the name: the file is older than STALE_S (UNTAGGED_STALE_S)."""
    m = _TAG.search(name)
    age = time.time() - path.stat().st_mtime if path is not None and path.exists() else 0.0
    if m is None:
        return age > UNTAGGED_STALE_S
    if m.group(2) != host_id():
        return age > STALE_S
    return not pid_alive(int(m.group(1)))


# -- scratch space ---------------------------------------------------------------------------------
SCRATCH_PREFIX = "pruneflow-"


def scratch_dir() -> tempfile.TemporaryDirectory:
    """A temporary folder (checkpoints on their way to the store) named after its owner process."""
    return tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{owner_tag()}-")


def scratch_roots() -> list[Path]:
    """Where scratch folders and spills are made: `$PRUNEFLOW_SCRATCH` (spills) and `$TMPDIR`."""
    roots = [Path(os.environ["PRUNEFLOW_SCRATCH"])] if os.environ.get("PRUNEFLOW_SCRATCH") else []
    tmp = Path(tempfile.gettempdir())
    return roots + [tmp] if tmp not in roots else roots


def dead_scratch() -> list[Path]:
    """Scratch folders and spills whose owner is gone (an untagged spill of an older release: after a day)."""
    out = []
    for root in scratch_roots():
        for p in root.glob(f"{SCRATCH_PREFIX}*"):
            rest = p.name.removeprefix(SCRATCH_PREFIX)
            if _TAG.match(rest.removeprefix("spill-")):
                if owner_is_dead(p.name, p):
                    out.append(p)
            elif rest.startswith("spill-") and p.is_dir() and time.time() - p.stat().st_mtime > STALE_S:
                out.append(p)
    return out


# -- the journal -----------------------------------------------------------------------------------
def journal_dir() -> Path:
    return pruneflow_home() / "proc"


def journal_path(tag: str | None = None) -> Path:
    return journal_dir() / f"{tag or owner_tag()}.json"


def read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _update(fn, create: bool = True) -> None:
    """Apply `fn(journal dict)` to this process's journal and write it back atomically."""
    with _lock:
        p = journal_path()
        if not create and not p.exists():
            return
        if not p.exists():
            atexit.register(_drop, p)  # a clean exit leaves nothing to reap
        j = read(p) or {"pid": os.getpid(), "host": host_id(), "started": time.time(),
                        "flow_runs": [], "uploads": [], "objects": [], "prefect_server": None, "mlflow_runs": [],
                        "stores": []}
        fn(j)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.parent / f".{p.name}.{uuid.uuid4().hex[:6]}"
        tmp.write_text(json.dumps(j))
        os.replace(tmp, p)


def add(field: str, item) -> None:
    _update(lambda j: j.setdefault(field, []).append(item))


def add_once(field: str, item) -> None:
    _update(lambda j: None if item in j.setdefault(field, []) else j[field].append(item))


def note(field: str, value) -> None:
    """Set `field` of this process's journal, if it has one."""
    _update(lambda j: j.__setitem__(field, value), create=False)


def remove(field: str, item) -> None:
    def fn(j):
        items = j.setdefault(field, [])
        if item in items:
            items.remove(item)

    _update(fn, create=False)


def _drop(path: Path) -> None:
    path.unlink(missing_ok=True)


def set_server(info: dict | None) -> None:
    _update(lambda j: j.__setitem__("prefect_server", info))


@contextlib.contextmanager
def _journaled(field: str, item: dict):
    add(field, item)
    try:
        yield
    finally:
        remove(field, item)


def uploading(store_url: str, key: str):
    """An S3 upload in progress: aborted if this process dies meanwhile."""
    return _journaled("uploads", {"store": store_url, "key": key})


def committing(store_url: str, sha: str):
    """An S3 object being written before its commit marker: collected if this process dies meanwhile."""
    return _journaled("objects", {"store": store_url, "sha": sha})


def dead_journals() -> list[tuple[Path, dict]]:
    """Journals of processes of this host that are gone."""
    out = []
    for p in sorted(journal_dir().glob("*.json")):
        j = read(p)
        if j.get("host") == host_id() and j.get("pid") and not pid_alive(int(j["pid"])):
            out.append((p, j))
    return out
