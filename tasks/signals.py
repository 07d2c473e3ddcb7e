"""Ctrl-C and SIGTERM stop a run within seconds and leave nothing more behind than a SIGKILL does —
with the flow run marked Cancelled instead of Crashed.

`install()` is the first thing the command line does (`flows.cli.main`), before any child process
exists. SIGINT and SIGTERM then call `_on_signal`, which

1. prints one line on stderr;
2. records the stop in this process's journal (`stopped_by`) and marks the flow runs this process
   executes Cancelled through its own temporary Prefect server, if it answers — in a helper thread
   with a bounded wait, since the main thread may have been interrupted holding a lock;
3. stops every child process but the watchdog: the temporary Prefect server (also while it is still
   starting, before anything has journaled it), and whatever else the run started;
4. exits at once (`os._exit`) with 128 + the signal's number: 130 for SIGINT, 143 for SIGTERM.

What the run had on disk — scratch folders, spills, store temporaries, open S3 uploads — is then
removed by its watchdog (`tasks.cleanup.watch`), exactly as after a SIGKILL; flow runs that could not
be marked in step 2 are marked Cancelled there. A second signal during those seconds skips to step 3.
The steps that finished are committed in the store, so a rerun reuses them.

Prefect swaps in its own SIGTERM handler while a flow runs (it raises an exception that libraries
may catch); `rearm()`, called at the start of every flow (`cleanup.begin_flow`), puts ours back.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from . import journal

_INSTALLED = [False]
_EXITING = [False]
WAIT_S = 10.0  # at most this long for the flow runs to be marked Cancelled


def install() -> None:
    """SIGINT and SIGTERM stop the run cleanly (see the module's docstring); main thread only."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    if not _INSTALLED[0]:
        from . import cleanup

        cleanup.ON_BEGIN_FLOW.append(rearm)  # Prefect's flow engine replaces the SIGTERM handler
    _INSTALLED[0] = True


def rearm() -> None:
    """Put the handlers back after a library replaced them (Prefect's flow engine does, for SIGTERM)."""
    if _INSTALLED[0]:
        install()


def exit_code(signum: int) -> int:
    return 128 + int(signum)


def _say(line: str) -> None:
    """One line on the terminal's stderr (sys.stderr may be redirected into the run's log)."""
    prefix = "\r\x1b[K" if os.isatty(2) else ""  # over a progress bar being drawn
    try:
        os.write(2, f"{prefix}{line}\n".encode())
    except OSError:
        pass


def _on_signal(signum, frame) -> None:
    code = exit_code(signum)
    if _EXITING[0]:  # a second signal while cleaning up: stop the children and go
        stop_children(grace_s=0.0)
        os._exit(code)
    _EXITING[0] = True
    name = signal.Signals(signum).name
    verb = "interrupted" if signum == signal.SIGINT else "terminated"
    began = journal.journal_path().exists()  # a flow has begun: its finished steps are in the store
    _say(f"{verb} ({name}): stopped" + ("; a rerun reuses the steps that finished" if began else ""))
    try:
        runs = _current_flow_run()
        t = threading.Thread(target=_record_and_cancel, args=(name, runs), daemon=True)
        t.start()
        t.join(WAIT_S)
        stop_children()
    finally:
        os._exit(code)


def _current_flow_run() -> list[str]:
    """The id of the flow run this thread is executing, if Prefect is loaded and one is."""
    if "prefect.context" not in sys.modules:
        return []
    try:
        ctx = sys.modules["prefect.context"].FlowRunContext.get()
        return [str(ctx.flow_run.id)] if ctx is not None and ctx.flow_run is not None else []
    except Exception:  # noqa: BLE001 - in a signal handler: never raise
        return []


def _record_and_cancel(reason: str, runs: list[str]) -> None:
    """Journal the stop (the watchdog then marks what is left Cancelled, not Crashed), and mark the
    flow runs Cancelled now through this process's own temporary server while it still answers."""
    try:
        journal.note("stopped_by", reason)
        from . import cleanup

        j = journal.read(journal.journal_path())
        runs = list(dict.fromkeys([*(j.get("flow_runs") or []), *runs]))
        if not runs:  # start-up: no flow run yet (and no import of Prefect here: the main thread may hold its lock)
            return
        server = j.get("prefect_server") or cleanup.temporary_server() or {}
        if server.get("api_url"):
            for rid in cleanup.mark_ended(runs, server["api_url"], cancelled=True, fallback=False):
                journal.remove("flow_runs", rid)
    except Exception:  # noqa: BLE001 - the watchdog (or the next run) does what this could not
        pass


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc), children before grandchildren."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def stop_children(grace_s: float = 5.0) -> None:
    """SIGTERM every descendant of this process but the watchdog; SIGKILL those alive after `grace_s`."""
    kids = [p for p in children(os.getpid()) if p not in journal.KEEP_PIDS]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in kids:
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
        t0 = time.monotonic()
        while sig == signal.SIGTERM and time.monotonic() - t0 < grace_s:
            kids = [p for p in kids if journal.pid_alive(p)]
            if not kids:
                return
            time.sleep(0.05)
