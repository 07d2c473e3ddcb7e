"""Reruns you can trust: misses say why, library versions are part of the key, identical runs started
together compute each step once, a frozen S3 endpoint fails fast, a cached sweep on a fresh worker
downloads no checkpoint, and what a killed run leaves is cleaned up."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.compress import compress

REPO = Path(__file__).resolve().parents[2]
MODEL_STEPS = ("load", "calibration", "capture", "score", "prune", "evaluate_dense", "evaluate")


def _env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PRUNEFLOW_FAULT"))}
    env.update(PRUNEFLOW_HOME=str(home), PREFECT_HOME=str(home / "prefect"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", DO_NOT_TRACK="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="240")
    env.update(extra)
    return env


def _cli(args: list[str], **kw) -> list[str]:
    return [sys.executable, "-m", "flows.cli", *args]


def test_a_miss_says_why(prefect_harness, tiny_spec, pf_home, monkeypatch):
    first = compress(spec=tiny_spec)
    assert first["cache_why"]["prune"] == "first run of this step in this store"
    second = compress(spec={**tiny_spec, "ratio": 0.25})
    assert second["cache"]["capture"] == "hit" and second["cache"]["score"] == "hit"
    assert second["cache_why"]["prune"] == "settings: ratio: 0.5 -> 0.25"
    assert "input artifact" in second["cache_why"]["evaluate"]
    # a new transformers makes every step that runs the model a miss, and the report says so
    from tasks import cachekey

    real = cachekey._dist_version
    monkeypatch.setattr(cachekey, "_dist_version", lambda n: "99.0" if n == "transformers" else real(n))
    third = compress(spec={**tiny_spec, "ratio": 0.25})
    assert all(third["cache"][s] == "miss" for s in MODEL_STEPS), third["cache"]
    assert all(f"transformers {real('transformers')} -> 99.0" in third["cache_why"][s] for s in MODEL_STEPS), \
        third["cache_why"]
    on_disk = json.loads((Path(third["artifacts"]["run_dir"]) / "report.json").read_text())
    assert on_disk["cache_why"] == third["cache_why"]


@pytest.mark.server
def test_two_identical_runs_started_together_compute_once(tiny_spec, tmp_path):
    """Two `pruneflow run` processes on one fresh home and store: every step is computed by exactly one
    of them (the other waits on the store's lock and reuses it), and MLflow registers one version."""
    home = tmp_path / "home"
    home.mkdir()
    procs = []
    for name in ("a", "b"):
        spec = {**tiny_spec, "name": f"twin-{name}", "store": {"url": str(home / "artifacts")},
                "tracking": {"enabled": True}}
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(spec))
        procs.append(subprocess.Popen(_cli(["run", str(p), "--quiet"]), cwd=REPO, env=_env(home),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    reps = [json.loads((home / "runs" / f"twin-{n}" / "report.json").read_text()) for n in ("a", "b")]
    for step in MODEL_STEPS:
        assert sorted(r["cache"][step] for r in reps) == ["hit", "miss"], (step, [r["cache"] for r in reps])
    assert reps[0]["artifacts"]["checkpoint"] == reps[1]["artifacts"]["checkpoint"]
    versions = {r["tracking"]["model_version"] for r in reps}
    assert len(versions) == 1, [r["tracking"] for r in reps]


@pytest.mark.server
def test_frozen_s3_endpoint_fails_within_60_s(tiny_spec, tmp_path):
    """moto stopped with SIGSTOP accepts connections but never answers: one line, exit 2, in <= 60 s."""
    from tests.conftest import VENV_BIN, free_port, stop_pid, wait_http

    port = free_port()
    moto = subprocess.Popen([str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/")
        s3 = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
              "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
        import s3fs

        s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": s3["AWS_ENDPOINT_URL"]},
                          skip_instance_cache=True).mkdir("frozen")
        spec = {**tiny_spec, "store": {"url": "s3://frozen/pf"}}
        p = tmp_path / "spec.yaml"
        p.write_text(yaml.safe_dump(spec))
        os.kill(moto.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        out = subprocess.run(_cli(["run", str(p)]), cwd=REPO, env=_env(tmp_path / "home", **s3), capture_output=True,
                             text=True, timeout=180)
        dt = time.monotonic() - t0
    finally:
        os.kill(moto.pid, signal.SIGCONT)
        stop_pid(moto)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "store.url" in lines[0] and "answers within" in lines[0], out.stderr
    assert dt <= 60, f"took {dt:.1f} s"


def _gets(log: Path, start: int, prefix: str) -> list[str]:
    """Paths of the GET requests moto logged after offset `start` under `prefix`."""
    text = log.read_text(errors="replace")[start:]
    return [p for p in re.findall(r'"GET (/\S+)', text) if p.startswith(prefix)]


@pytest.mark.server
def test_cached_sweep_on_a_fresh_worker_downloads_no_checkpoint(prefect_harness, tiny_spec, s3_env, moto_s3,
                                                                 monkeypatch, tmp_path):
    from flows.sweep import run_sweep
    from tasks import store as store_mod

    spec = {**tiny_spec, "store": {"url": s3_env}}
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"moto-{moto_s3['AWS_ENDPOINT_URL'].rsplit(':', 1)[1]}.log"
    bucket_path = "/" + s3_env.split("://", 1)[1]
    start = len(log.read_text(errors="replace"))
    first = run_sweep(spec, ["wanda"], [0.3, 0.5], "sequential")
    ckpts = ["/" + r["checkpoint"].split("://", 1)[1] + "/" for r in first["rows"]]
    time.sleep(0.5)
    # the count works: the first sweep read its checkpoints back to evaluate them
    assert any(g.startswith(c) for g in _gets(log, start, bucket_path) for c in ckpts)
    # a fresh worker: an empty PRUNEFLOW_HOME (no local copies) and no store objects in memory
    monkeypatch.setenv("PRUNEFLOW_HOME", str(tmp_path / "fresh-worker"))
    store_mod._STORES.clear()
    start = len(log.read_text(errors="replace"))
    second = run_sweep(spec, ["wanda"], [0.3, 0.5], "sequential")
    assert all(v["miss"] == 0 for v in second["step_counts"].values()), json.dumps(second["step_counts"])
    time.sleep(0.5)  # the server's access log is written after each response
    gets = _gets(log, start, bucket_path)
    assert not [g for g in gets if any(g.startswith(c) for c in ckpts)], f"checkpoint objects downloaded: {gets}"
    assert not (tmp_path / "fresh-worker" / "cache" / "store").exists() or \
        not any((tmp_path / "fresh-worker" / "cache" / "store").iterdir())


@pytest.mark.server
def test_killed_uploads_are_aborted_by_the_next_run(s3_env, tmp_path, monkeypatch):
    """An open multipart upload of a process that died (its journal names the key) is aborted."""
    from tasks import cleanup, journal
    from tasks.store import open_store

    monkeypatch.setenv("PRUNEFLOW_HOME", str(tmp_path / "home"))
    st = open_store(s3_env)
    bucket, _, prefix = s3_env.split("://", 1)[1].partition("/")
    key = f"{prefix}/objects/ab/abc/model.safetensors"
    up = st.fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    st.fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 1024)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    jd = journal.journal_dir()
    jd.mkdir(parents=True)
    (jd / f"{journal.owner_tag(dead.pid)}.json").write_text(json.dumps(
        {"pid": dead.pid, "host": journal.host_id(), "uploads": [{"store": s3_env, "key": f"s3://{bucket}/{key}"}],
         "flow_runs": [], "prefect_server": None}))
    assert st.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads")
    done = cleanup.reclaim(s3_env)
    assert done["uploads_aborted"] == [f"s3://{bucket}/{key}"]
    assert not st.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads")
    assert not list(jd.glob("*.json"))


def _flow_run_states(env: dict) -> dict:
    code = ("from prefect.client.orchestration import get_client\n"
            "from prefect.client.schemas.sorting import FlowRunSort\n"
            "import json\n"
            "with get_client(sync_client=True) as c:\n"
            "    runs = c.read_flow_runs(limit=50, sort=FlowRunSort.START_TIME_DESC)\n"
            "    print(json.dumps({str(r.id): r.state.type.value for r in runs}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.server
def test_sigkill_during_prune_leaves_nothing_behind(tiny_spec, tmp_path):
    """SIGKILL of the run process alone (as the OOM killer does) mid prune-commit: its watchdog marks the
    flow run Crashed and stops the orphaned temporary Prefect server; the rerun reclaims the torn store
    folder and the temporary checkpoint; in the end nothing is left in the store, in $TMPDIR or running."""
    home, tmpdir = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmpdir.mkdir()
    spec = {**tiny_spec, "store": {"url": str(home / "artifacts")}}
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    fault = tmp_path / "fault"
    env = _env(home, TMPDIR=str(tmpdir))
    proc = subprocess.Popen(_cli(["run", str(p), "--quiet"]), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**env, "PRUNEFLOW_FAULT": "commit:checkpoint",
                                                            "PRUNEFLOW_FAULT_FILE": str(fault)})
    t0 = time.time()
    while not fault.exists():
        assert proc.poll() is None, "the run ended before the fault point"
        assert time.time() - t0 < 300
        time.sleep(0.2)
    jfile = home / "proc" / f"{_tag(proc.pid)}.json"
    server = json.loads(jfile.read_text())["prefect_server"]["pid"]
    assert list((home / "artifacts" / "objects").glob("*/.tmp-*")) and list(tmpdir.glob("pruneflow-*"))
    os.kill(proc.pid, signal.SIGKILL)  # the run only: its temporary server would be orphaned
    proc.wait(timeout=30)
    t0 = time.time()
    while jfile.exists() and time.time() - t0 < 180:  # the watchdog drops the journal when it is done
        time.sleep(0.5)
    assert not _alive(server), "the orphaned temporary Prefect server is still running"
    assert not jfile.exists(), jfile.read_text()  # the watchdog did everything
    assert not list(tmpdir.glob("pruneflow-*"))  # its temporary checkpoint went with it
    out = subprocess.run(_cli(["run", str(p), "--quiet"]), cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not list((home / "artifacts" / "objects").glob("*/.tmp-*"))  # the torn store folder is reclaimed
    assert not [q for q in tmpdir.iterdir() if q.name.startswith("pruneflow-")]
    states = _flow_run_states(env)
    assert sorted(states.values()) == ["COMPLETED", "CRASHED"], states
    assert not list((home / "proc").glob("*.json"))


def _tag(pid: int) -> str:
    from tasks.journal import owner_tag

    return owner_tag(pid)


def _alive(pid: int) -> bool:
    from tasks.journal import pid_alive

    return pid_alive(pid)
