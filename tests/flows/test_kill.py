"""SIGKILL in the middle of a step: the next run finishes, reuses every completed step, never reads a
torn artifact. The run is a real `pruneflow run` process (Prefect ephemeral mode); a fault hook makes
it hang right after the checkpoint's files are written and before they are committed, and the test
kills the whole process group there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def _env(home: Path, prefect_home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PRUNEFLOW_FAULT"))}
    env.update(PRUNEFLOW_HOME=str(home), PREFECT_HOME=str(prefect_home), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", DO_NOT_TRACK="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="240")
    env.update(extra)
    return env


@pytest.mark.server
def test_sigkill_mid_step_then_rerun_reuses_completed_steps(tiny_spec, tmp_path):
    home = Path(tiny_spec["store"]["url"]).parent
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec))
    prefect_home = tmp_path / "prefect"
    fault_file = tmp_path / "fault"
    cmd = [sys.executable, "-m", "flows.cli", "run", str(spec_path), "--quiet"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=_env(home, prefect_home, PRUNEFLOW_FAULT="commit:checkpoint",
                                     PRUNEFLOW_FAULT_FILE=str(fault_file),
                                     # no watchdog: the rerun itself must cope with the torn state
                                     PRUNEFLOW_WATCHDOG="0"))
    try:
        t0 = time.time()
        while not fault_file.exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() - t0 < 300, "the run never reached the checkpoint commit"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its ephemeral Prefect server
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    store = home / "artifacts"
    done = {p.parent.name for p in (store / "index").glob("*/*.json")}
    assert {"load", "calibration", "capture", "score"} <= done and "prune" not in done
    # the torn checkpoint is on disk, uncommitted: a temporary folder, no commit marker for it
    torn = list((store / "objects").glob("*/.tmp-*"))
    assert torn, "expected the killed writer's temporary folder"
    assert not (home / "runs" / "tiny" / "report.json").exists()

    p = subprocess.run(cmd, cwd=REPO, env=_env(home, prefect_home), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rep = json.loads((home / "runs" / "tiny" / "report.json").read_text())
    c = rep["cache"]
    assert [c[s] for s in ("load", "calibration", "capture", "score")] == ["hit"] * 4, c
    assert c["prune"] == "miss" and c["evaluate"] == "miss"
    # the committed checkpoint is complete and intact
    from tasks.store import ArtifactStore

    st = ArtifactStore(str(store), cache_dir=tmp_path / "c")
    sha = rep["artifacts"]["checkpoint"].rstrip("/").rsplit("/", 1)[1]
    path = st.local_path({"uri": rep["artifacts"]["checkpoint"], "sha256": sha, "dir": True, "kind": "checkpoint"})
    assert (path / "model.safetensors").exists() and (path / "plan.json").exists()
