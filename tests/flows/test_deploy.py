"""A real Prefect server on 127.0.0.1 (random port, temporary PREFECT_HOME): create the process work
pool, apply the `smoke` deployment from deployments/prefect.yaml, start a worker, run the deployment
and see it complete. Every process is started here and stopped here by its PID."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, stop_pid, wait_http

REPO = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).parent / "prefect")


@pytest.mark.server
def test_deployment_runs_on_a_process_worker(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="true",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
        PRUNEFLOW_REPO=str(REPO),
        PRUNEFLOW_HOME=str(tmp_path / "pfhome"),
        PYTHONPATH=str(REPO),
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=open(logs / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        wait_http(f"http://127.0.0.1:{port}/api/health", timeout=240)

        def prefect(*args, timeout=240, ok=lambda p: p.returncode == 0):
            p = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
            assert ok(p), f"{args}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
            return p.stdout

        def deployed(p):
            # Prefect 3.8.8 + fastapi 0.154: after creating the deployment, `prefect deploy` asks the
            # server for online workers and gets a 422 (limit/offset sent as null). The deployment is
            # created; only that final hint fails. Accept exactly that case.
            known = "workers/filter" in p.stdout + p.stderr and "422" in p.stdout + p.stderr
            return "successfully created" in p.stdout and (p.returncode == 0 or known)

        prefect("work-pool", "create", "gpu-pool", "--type", "process")
        prefect("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "smoke", ok=deployed)
        assert "smoke" in prefect("deployment", "inspect", "smoke/smoke")
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "gpu-pool", "--limit", "1"], env=env,
                                  cwd=tmp_path, stdout=open(logs / "worker.log", "wb"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        out = prefect("deployment", "run", "smoke/smoke", "--param", "n=5", "--watch", "--watch-interval", "2",
                      "--watch-timeout", "300", timeout=360)
        assert "Completed" in out, out[-2000:] + (logs / "worker.log").read_text()[-3000:]
        # the flow ran in the worker and wrote its artifact through the store
        written = list((tmp_path / "pfhome" / "artifacts" / "objects").glob("*/*/smoke.json"))
        assert written and json.loads(written[0].read_text())["squares"] == [0, 1, 4, 9, 16]
    finally:
        if worker is not None:
            stop_pid(worker)
        stop_pid(server)
    t0 = time.time()
    while server.poll() is None and time.time() - t0 < 10:
        time.sleep(0.2)
    assert server.poll() is not None
