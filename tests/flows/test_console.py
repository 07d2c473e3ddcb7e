"""The console of a real `pruneflow run` process: step bars on stderr, a short summary on stdout, the
rest in the run's log file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _screen(text: str) -> list[str]:
    """What a terminal shows: for every line, what its last carriage return left."""
    return [ln.rsplit("\r", 1)[-1] for ln in text.split("\n") if ln.rsplit("\r", 1)[-1].strip()]


def test_run_console_is_bars_and_a_short_summary(tiny_llama_dir, tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "PRUNEFLOW_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    for k in ("PREFECT_API_URL", "PRUNEFLOW_QUIET", "PRUNEFLOW_CONSOLE"):
        env.pop(k, None)
    args = ["run", "--model", str(tiny_llama_dir), "--ratio", "0.5", "--name", "console", "--device", "cpu",
            "--set", "calibration.n_samples=4", "--set", "calibration.seq_len=32", "--set", "evaluation.tasks=[]",
            "--set", "evaluation.ppl_seq_len=32", "--set", "evaluation.ppl_windows=2", "--set", "tracking.enabled=false"]
    r = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                       timeout=900)  # bytes: text mode would turn the bars' carriage returns into new lines
    stdout, stderr = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 0, stderr[-2000:]
    out, err = _screen(stdout), _screen(stderr)
    # stderr: one finished bar per step that ran, nothing else (no Prefect / library log lines)
    assert all(ln.startswith("✓ ") for ln in err), err
    steps = [ln.split()[1] for ln in err]
    assert steps == ["prefect", "load", "calibration", "capture", "score", "prune", "evaluate", "evaluate_dense",
                     "report"], steps
    # stdout: the summary, short, with the figures, the checkpoint and how to load it
    assert len(out) <= 15, out
    assert "removed" in out[0] and "decoder-layer parameters" in out[0]
    ckpt = next(ln for ln in out if ln.startswith("checkpoint:")).split(":", 1)[1].strip()
    assert (Path(ckpt) / "config.json").is_file()
    assert any(ln.startswith("load it:") and ckpt in ln for ln in out)
    assert any(ln.startswith("| ppl.fixed_window_32") for ln in out)
    log = home / "runs" / "console" / "pruneflow.log"
    text = log.read_text()
    assert "prefect" in text and "step prune" in text  # the full log is in the run's log file
