"""SIGINT (Ctrl-C) and SIGTERM (`timeout`, k8s, CI) of a real `pruneflow run` process: during the
temporary Prefect server's start-up and in the middle of prune. The run ends with one line and exit
130 / 143; within 30 s no process of the run is left (its Prefect server included); the flow run is
Cancelled; its temporaries are gone; a rerun reuses the steps that finished. And SIGKILL of a
disk-placement prune: its spill, scratch and store temporaries are reclaimed by the watchdog."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks.journal import pid_alive
from tasks.signals import children

REPO = Path(__file__).resolve().parents[2]
CODES = {"SIGINT": 130, "SIGTERM": 143}


def _env(home: Path, tmp: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_API", "PRUNEFLOW_FAULT", "PRUNEFLOW_SCRATCH", "PRUNEFLOW_WATCHDOG"))}
    (tmp / "tmp").mkdir(exist_ok=True)
    env.update(PRUNEFLOW_HOME=str(home), PREFECT_HOME=str(tmp / "prefect"), TMPDIR=str(tmp / "tmp"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DO_NOT_TRACK="true",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")
    env.update(extra)
    return env


def _background_job() -> None:
    """Start as a shell starts `pruneflow run … &` in a script: SIGINT ignored. Python then leaves it
    ignored (no KeyboardInterrupt): how the issue saw Ctrl-C / `kill -INT` do nothing, twice."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start(spec: dict, tmp: Path, env: dict, log: Path) -> subprocess.Popen:
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(path), "--quiet"], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_background_job)


def _wait_for(cond, proc: subprocess.Popen, log: Path, what: str, limit: float = 600):
    t0 = time.time()
    while not (found := cond()):
        assert proc.poll() is None, f"the run ended before {what}: " + log.read_text()[-3000:]
        assert time.time() - t0 < limit, f"the run never reached {what}"
        time.sleep(0.05)
    return found


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _server(proc: subprocess.Popen) -> list[int]:
    return [p for p in children(proc.pid) if "uvicorn" in _cmd(p)]


def _all_gone(pids: list[int], limit: float = 30.0) -> list[int]:
    """The pids still alive after `limit` seconds (none, normally well before)."""
    t0 = time.time()
    while (alive := [p for p in pids if pid_alive(p)]) and time.time() - t0 < limit:
        time.sleep(0.1)
    return alive


def _stop(proc: subprocess.Popen, pids: list[int]) -> None:
    for p in [proc.pid, *pids]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def _flow_run_states(prefect_home: Path) -> list[str]:
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        return [r[0] for r in db.execute("select state_type from flow_run")]


def _leftovers(home: Path, tmp: Path, scratch: Path | None = None) -> list[str]:
    left = [str(p) for p in (tmp / "tmp").glob("pruneflow-*")]
    left += [str(p) for p in (home / "artifacts").glob("objects/*/.tmp-*")]
    left += [str(p) for p in (home / "proc").glob("*.json")]
    if scratch is not None:
        left += [str(p) for p in scratch.iterdir()]
    return left


def _wait_clean(home: Path, tmp: Path, scratch: Path | None = None, limit: float = 30.0) -> list[str]:
    t0 = time.time()
    while (left := _leftovers(home, tmp, scratch)) and time.time() - t0 < limit:
        time.sleep(0.2)
    return left


@pytest.mark.server
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_during_prune_stops_the_run_and_the_rerun_reuses_finished_steps(tiny_spec, tmp_path, sig):
    home = Path(tiny_spec["store"]["url"]).parent
    fault = tmp_path / "fault"
    env = _env(home, tmp_path)
    log = tmp_path / "run.log"
    # a fault hook holds the prune step right after the checkpoint's files are written, before their commit
    proc = _start(tiny_spec, tmp_path, {**env, "PRUNEFLOW_FAULT": "commit:checkpoint",
                                        "PRUNEFLOW_FAULT_FILE": str(fault)}, log)
    procs: list[int] = []
    try:
        _wait_for(fault.exists, proc, log, "the prune step's commit")
        procs = children(proc.pid)  # its Prefect server and its watchdog
        assert _server(proc), [_cmd(p) for p in procs]
        assert list((tmp_path / "tmp").glob("pruneflow-*")) and list((home / "artifacts").glob("objects/*/.tmp-*"))
        os.kill(proc.pid, getattr(signal, sig))
        code = proc.wait(timeout=30)
        assert _all_gone(procs) == [], [_cmd(p) for p in procs if pid_alive(p)]
    finally:
        if proc.poll() is None or any(pid_alive(p) for p in procs):
            _stop(proc, procs)
    out = log.read_text().strip().splitlines()
    assert code == CODES[sig], out
    assert len(out) == 1 and sig in out[0] and "rerun" in out[0], out  # --quiet: the one line, nothing else
    assert _wait_clean(home, tmp_path) == []
    assert _flow_run_states(tmp_path / "prefect") == ["CANCELLED"]

    p = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(tmp_path / "spec.yaml"), "--quiet"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    rep = json.loads((home / "runs" / "tiny" / "report.json").read_text())
    assert [rep["cache"][s] for s in ("load", "calibration", "capture", "score")] == ["hit"] * 4, rep["cache"]
    assert rep["cache"]["prune"] == "miss"


@pytest.mark.server
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_while_the_prefect_server_starts_leaves_no_server(tiny_spec, tmp_path, sig):
    home = Path(tiny_spec["store"]["url"]).parent
    log = tmp_path / "run.log"
    proc = _start(tiny_spec, tmp_path, _env(home, tmp_path), log)
    procs: list[int] = []
    try:
        server = _wait_for(lambda: _server(proc), proc, log, "the start of its Prefect server")
        assert not (home / "proc").exists() or not list((home / "proc").glob("*.json"))  # no flow has begun
        procs = children(proc.pid)
        os.kill(proc.pid, getattr(signal, sig))
        code = proc.wait(timeout=30)
        assert _all_gone([*server, *procs]) == [], [_cmd(p) for p in [*server, *procs] if pid_alive(p)]
    finally:
        if proc.poll() is None or any(pid_alive(p) for p in procs):
            _stop(proc, procs)
    out = log.read_text().strip().splitlines()
    assert code == CODES[sig], out
    assert len(out) == 1 and sig in out[0], out


def _four_layer_llama(src: Path, dst: Path) -> Path:
    """The tiny test model with 4 layers (SlimGPT's schedule leaves the first ones nearly whole)."""
    import shutil

    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    shutil.copytree(src, dst)
    cfg = AutoConfig.from_pretrained(src)
    cfg.num_hidden_layers = 4
    torch.manual_seed(0)
    for f in dst.glob("model*.safetensors"):
        f.unlink()
    LlamaForCausalLM(cfg).save_pretrained(dst)
    return dst


@pytest.mark.server
def test_sigkill_of_a_disk_placement_prune_leaves_no_spill_scratch_or_store_temporary(tiny_spec, tiny_llama_dir,
                                                                                      tmp_path):
    home = Path(tiny_spec["store"]["url"]).parent
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    model = _four_layer_llama(tiny_llama_dir, tmp_path / "llama4")
    spec = {**tiny_spec, "method": {"name": "slimgpt", "settings": {}},
            "model": {**tiny_spec["model"], "ref": str(model), "placement": "disk"}}
    fault = tmp_path / "fault"
    # held after SlimGPT's last layer: the layers it rewrote before are spilled
    env = _env(home, tmp_path, PRUNEFLOW_SCRATCH=str(scratch), PRUNEFLOW_FAULT="progress:slimgpt:4",
               PRUNEFLOW_FAULT_FILE=str(fault))
    log = tmp_path / "run.log"
    proc = _start(spec, tmp_path, env, log)
    procs: list[int] = []
    try:
        _wait_for(fault.exists, proc, log, "SlimGPT's last layer")
        procs = children(proc.pid)
        spills = [p for p in scratch.iterdir() if p.name.startswith(f"pruneflow-spill-{proc.pid}.")]
        assert spills and any(f.suffix == ".safetensors" for f in spills[0].iterdir()), list(scratch.iterdir())
        os.kill(proc.pid, signal.SIGKILL)  # the run alone, as the OOM killer does: its server is orphaned
        proc.wait(timeout=30)
        assert _wait_clean(home, tmp_path, scratch, limit=60) == []
        assert _all_gone(procs) == [], [_cmd(p) for p in procs if pid_alive(p)]
    finally:
        if proc.poll() is None or any(pid_alive(p) for p in procs):
            _stop(proc, procs)


@pytest.mark.server
def test_fresh_pruneflow_home_with_an_s3_store_completes(tiny_spec, s3_env, tmp_path):
    """A fresh worker: $PRUNEFLOW_HOME does not exist and nothing local makes it (the store is on S3),
    PREFECT_HOME is its default under it. Prefect's server used to fail to make its folder and restart
    forever."""
    home = tmp_path / "fresh" / "home"
    spec = {**tiny_spec, "store": {"url": s3_env}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "PRUNEFLOW_"))}
    env.update(PRUNEFLOW_HOME=str(home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300",
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    with open(tmp_path / "run.log", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(path), "--quiet", "--json"], cwd=REPO,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            _stop(proc, children(proc.pid))
    text = (tmp_path / "run.log").read_text()
    assert proc.returncode == 0, text[-3000:]
    rep = json.loads(text[text.index("{"):])
    assert rep["artifacts"]["checkpoint"].startswith(s3_env)
    assert (home / "prefect" / "prefect.db").is_file()
