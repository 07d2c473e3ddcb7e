"""Clean up after killed runs: what `tasks.journal` recorded, and leftovers named after dead owners.

* `reclaim(store_url)` runs at the start of every flow: temporary folders and disk-placement spills of
  dead processes in `$PRUNEFLOW_SCRATCH`, `$TMPDIR` and in the stores they wrote to, incomplete S3
  multipart uploads a dead process had open, its Prefect flow runs (marked Crashed, or Cancelled when
  a signal stopped it: `tasks.signals`) and its orphaned temporary Prefect server (stopped).
* `start_watchdog()` starts, once per process and home, a small detached process that waits for this
  one to end and then does the same for it at once — while its temporary Prefect server may still be
  up to record the crash. Whatever the watchdog could not do, the next run's `reclaim` does.

`python -m tasks.cleanup watch PID HOME` is the watchdog; it imports only the standard library until
there is something to clean.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import journal

log = logging.getLogger("pruneflow.cleanup")
_WATCHED: set[tuple[int, str]] = set()


def reclaim(store_url: str | None = None) -> dict:
    """Clean what dead processes of this host left; returns what was done (for the run log)."""
    done: dict[str, list] = {"scratch": [], "store": [], "uploads_aborted": [], "objects_dropped": [],
                             "flow_runs_crashed": [], "servers_stopped": []}
    for p in journal.dead_scratch():
        shutil.rmtree(p, ignore_errors=True)
        done["scratch"].append(str(p))
    for path, j in journal.dead_journals():
        reap(path, j, done)
    if store_url is not None:
        from .store import open_store

        done["store"] = open_store(store_url).reclaim()
    if any(done.values()):
        log.info("cleaned up after killed runs: %s", {k: len(v) for k, v in done.items() if v})
    return done


def reap(path: Path, j: dict, done: dict) -> None:
    """Undo what the dead owner of journal `j` left; the journal file goes once nothing is left to do."""
    left = dict(j)
    uploads = j.get("uploads") or []
    if uploads:
        from .store import open_store

        still = []
        for item in uploads:
            try:
                n = open_store(item["store"]).abort_uploads([item["key"]])
                done["uploads_aborted"].extend([item["key"]] * n)
            except Exception as e:  # noqa: BLE001 - the store may be unreachable now: later
                log.warning("could not abort the upload of %s (%s)", item["key"], type(e).__name__)
                still.append(item)
        left["uploads"] = still
    objects = j.get("objects") or []
    if objects:  # S3 objects written before a commit marker that never came
        from .store import open_store

        still = []
        for item in objects:
            try:
                if open_store(item["store"]).drop_uncommitted(item["sha"]):
                    done.setdefault("objects_dropped", []).append(item["sha"])
            except Exception as e:  # noqa: BLE001 - the store may be unreachable now: later
                log.warning("could not delete the uncommitted object %s (%s)", item["sha"][:12], type(e).__name__)
                still.append(item)
        left["objects"] = still
    for url in j.get("stores") or []:  # the dead writer's store temporaries (a local store's `.tmp-*`)
        try:
            from .store import open_store

            done.setdefault("store", []).extend(open_store(url).reclaim())
        except Exception as e:  # noqa: BLE001 - an unreachable store: the next run reclaims it
            log.warning("could not reclaim the store %s (%s)", url, type(e).__name__)
    server = j.get("prefect_server") or {}
    runs = j.get("flow_runs") or []
    if runs:
        crashed = mark_ended(runs, server.get("api_url"), cancelled=bool(j.get("stopped_by")))
        done["flow_runs_crashed"].extend(crashed)
        left["flow_runs"] = [r for r in runs if r not in crashed]
    if server.get("pid") and _stop_server(int(server["pid"])):
        done["servers_stopped"].append(server["pid"])
    left["prefect_server"] = None
    if left.get("uploads") or left.get("objects") or left.get("flow_runs"):
        path.write_text(json.dumps(left))
    else:
        path.unlink(missing_ok=True)


def mark_ended(run_ids: list[str], api_url: str | None, cancelled: bool = False,
               fallback: bool = True) -> list[str]:
    """Set the flow runs Crashed (Cancelled: stopped by a signal) through the given API (the dead run's
    own server, if it is still up), else (`fallback`) through the API this process uses. Returns the ids
    that were marked."""
    try:
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled, Crashed
    except ImportError:
        return []
    end = (lambda: Cancelled(message="stopped by a signal")) if cancelled else \
        (lambda: Crashed(message="the process running it was killed"))
    marked = []
    urls = [api_url] if api_url and _answers(api_url) else []
    if fallback:
        urls.append(None)
    for url in urls:
        try:
            if url:
                from prefect.settings import PREFECT_API_URL, temporary_settings

                ctx = temporary_settings({PREFECT_API_URL: url})
            else:
                from contextlib import nullcontext

                ctx = nullcontext()
            with ctx, get_client(sync_client=True) as client:
                for rid in run_ids:
                    if rid in marked:
                        continue
                    fr = client.read_flow_run(rid)
                    if fr.state is not None and not fr.state.is_final():
                        client.set_flow_run_state(rid, end(), force=True)
                    marked.append(rid)
            break
        except Exception as e:  # noqa: BLE001 - no API reachable now: the next run marks them
            log.debug("marking flow runs crashed via %s failed: %s", url, e)
    return marked


def _answers(url: str) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(url.rstrip("/") + "/health", timeout=2)
        return True
    except Exception:  # noqa: BLE001
        return False


def _stop_server(pid: int) -> bool:
    """Stop an orphaned temporary Prefect server (checking it is one: pids get reused)."""
    if not journal.pid_alive(pid):
        return False
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    if "uvicorn" not in cmd and "prefect" not in cmd:
        return False
    os.kill(pid, signal.SIGTERM)
    for _ in range(50):
        if not journal.pid_alive(pid):
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return True


# -- flows -----------------------------------------------------------------------------------------
def begin_flow(store_url: str | None) -> str | None:
    """At the start of a flow: clean up after dead runs, journal this flow run, start the watchdog."""
    reclaim(store_url)
    rid = None
    try:
        from prefect.runtime import flow_run

        rid = flow_run.id
    except Exception:  # noqa: BLE001
        pass
    if rid:
        journal.add("flow_runs", str(rid))
    if store_url:
        journal.add_once("stores", store_url)
    server = temporary_server()
    if server:
        journal.set_server(server)
    start_watchdog()
    for hook in ON_BEGIN_FLOW:  # tasks.signals: put back the handlers Prefect's flow engine replaced
        hook()
    return rid


def flow_ended(flow, flow_run, state) -> None:
    """A Prefect flow hook (completion, failure, cancellation): this run leaves nothing to reap."""
    journal.remove("flow_runs", str(flow_run.id))


ON_BEGIN_FLOW: list = []  # called when a flow begins (tasks.signals adds its re-arming)


def temporary_server() -> dict | None:
    """The temporary Prefect server this process started (ephemeral mode), if any."""
    try:
        from prefect.server.api.server import SubprocessASGIServer
    except ImportError:
        return None
    for srv in list(getattr(SubprocessASGIServer, "_instances", {}).values()):
        proc = getattr(srv, "server_process", None)
        if proc is not None and proc.poll() is None:
            return {"pid": proc.pid, "api_url": f"{srv.address}/api"}
    return None


def start_watchdog() -> None:
    home = str(journal.pruneflow_home())
    key = (os.getpid(), home)
    if key in _WATCHED or os.environ.get("PRUNEFLOW_WATCHDOG") == "0":
        return
    _WATCHED.add(key)
    env = {**os.environ, "PRUNEFLOW_HOME": home}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "tasks.cleanup", "watch", str(os.getpid()), home], env=env,
                            cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    journal.KEEP_PIDS.add(proc.pid)  # a signal stops this process's children, never its watchdog


def watch(pid: int) -> None:
    while journal.pid_alive(pid):
        time.sleep(1.0)
    # scratch and spills first: the journal goes last, so its disappearance means everything is done
    for p in journal.dead_scratch():
        if journal.owner_tag(pid) in p.name:
            shutil.rmtree(p, ignore_errors=True)
    path = journal.journal_dir() / f"{journal.owner_tag(pid)}.json"
    dead = [p for p in journal.journal_dir().glob("*.json") if p == path]
    for p in dead:
        reap(p, journal.read(p), {"store": [], "uploads_aborted": [], "flow_runs_crashed": [], "servers_stopped": []})


if __name__ == "__main__":  # python -m tasks.cleanup watch PID HOME
    if len(sys.argv) == 4 and sys.argv[1] == "watch":
        os.environ["PRUNEFLOW_HOME"] = sys.argv[3]
        watch(int(sys.argv[2]))
