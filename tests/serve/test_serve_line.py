"""`pruneflow run`'s "serve it" line, run as printed, answers an OpenAI-style completion on 127.0.0.1.

The run is `make run`'s default (SlimGPT, `gqa: per_group`, `export: vllm`) on a tiny Llama (8 query /
4 KV heads of 32, which the vLLM CPU attention supports; a BPE tokenizer), so its query heads differ
between layers and its servable folder is written for pruneflow's vLLM plugin (no remote code). The
printed command is split as a shell would and started as it is, plus `--port` (a free one), with the
CPU settings of test_vllm.py (VLLM_CPU_ENV) in the environment; the greedy completion of a text prompt
must be `load_pruned`'s greedy continuation.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from pruning_core.checkpoint import load_pruned
from tests.conftest import free_port, stop_pid, write_tiny_llama
from tests.serve.test_vllm import VLLM_CPU_ENV
from tests.serve_kinds import greedy

REPO = Path(__file__).resolve().parents[2]
N_NEW = 8

pytestmark = pytest.mark.serve


def _run_default(model: Path, home: Path) -> tuple[str, dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PRUNEFLOW_"))}
    env.update(PRUNEFLOW_HOME=str(home), PREFECT_HOME=str(home / "prefect"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PATH=os.defpath)  # `vllm` is not on PATH: the line must say where it is
    args = ["run", "--model", str(model), "--ratio", "0.3", "--name", "serve-line", "--device", "cpu", "--quiet",
            "--set", "calibration.n_samples=8", "--set", "calibration.seq_len=64", "--set", "evaluation.tasks=[]",
            "--set", "evaluation.ppl_seq_len=32", "--set", "evaluation.ppl_windows=2",
            "--set", "tracking.enabled=false"]
    r = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("serve it:"))
    report = json.loads((home / "runs" / "serve-line" / "report.json").read_text())
    return line.split(":", 1)[1].strip(), report


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, deadline_s: float = 600) -> None:
    t0 = time.time()
    while time.time() - t0 < deadline_s:
        assert proc.poll() is None, f"vllm serve exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    raise AssertionError(f"vllm serve did not answer in {deadline_s} s:\n{log.read_text()[-3000:]}")


def test_run_prints_a_serve_command_that_answers_completions(tmp_path):
    assert (REPO / ".venv-serve" / "bin" / "vllm").exists(), "no .venv-serve: `make serve-env`"
    torch.set_num_threads(1)
    model = write_tiny_llama(tmp_path / "tiny", hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=4, head_dim=32)
    command, report = _run_default(model, tmp_path / "home")
    served = report["artifacts"]["servable_local"]
    assert report["settings"]["gqa"] == "per_group" and report["servable"]["layout"] == "plugin", report["servable"]
    ckpt = json.loads((Path(report["artifacts"]["checkpoint_local"]) / "config.json").read_text())
    assert len({d["n_heads"] for d in ckpt["pruneflow_layers"]}) > 1  # query heads differ between layers
    argv = shlex.split(command)  # vllm-cpu's `vllm` script fails on its dist name: its server module
    assert argv[1:] == ["-m", "vllm.entrypoints.openai.api_server", "--model", served, "--enforce-eager",
                        "--host", "127.0.0.1"], command
    assert Path(argv[0]) == REPO / ".venv-serve" / "bin" / "python"

    port, log = free_port(), tmp_path / "vllm.log"
    env = {**os.environ, **VLLM_CPU_ENV, "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([*argv, "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(proc, f"{base}/v1/models", log)
        prompt = "def parse(text):\n    return"
        res = _post(f"{base}/v1/completions", {"model": served, "prompt": prompt, "max_tokens": N_NEW,
                                               "temperature": 0, "ignore_eos": True})
    finally:
        stop_pid(proc, timeout=60)
    assert res["object"] == "text_completion" and res["usage"]["completion_tokens"] == N_NEW, res
    pruned, tok = load_pruned(report["artifacts"]["checkpoint_local"])
    want = tok.decode(greedy(pruned, [tok(prompt)["input_ids"]], N_NEW)[0])
    assert res["choices"][0]["text"] == want, (res["choices"][0]["text"], want)
