"""The console of a real `pruneflow run` process: step bars on stderr, a short summary on stdout, the
rest in the run's log file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _screen(text: str) -> list[str]:
    """What a terminal shows at the end: a tiny emulator of what tqdm writes (\\r, \\n, ESC[A cursor up,
    characters overwriting in place), so that bars redrawn in place and nested bars cleared on close
    leave what a person would see."""
    rows: list[list[str]] = [[]]
    r = c = 0
    i = 0
    while i < len(text):
        ch = text[i]
        if text.startswith("\x1b[A", i):
            r, i = max(r - 1, 0), i + 3
            continue
        if ch == "\x1b":  # other escape sequences (none expected): skip to the final letter
            j = i + 1
            while j < len(text) and not text[j].isalpha():
                j += 1
            i = j + 1
            continue
        if ch == "\n":
            r, c = r + 1, 0
        elif ch == "\r":
            c = 0
        else:
            while len(rows) <= r:
                rows.append([])
            row = rows[r]
            row.extend(" " * (c + 1 - len(row)))
            row[c] = ch
            c += 1
        while len(rows) <= r:
            rows.append([])
        i += 1
    return [ln for ln in ("".join(row).rstrip() for row in rows) if ln.strip()]


def test_run_console_is_bars_and_a_short_summary(tiny_llama_dir, tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "PRUNEFLOW_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    for k in ("PREFECT_API_URL", "PRUNEFLOW_QUIET", "PRUNEFLOW_CONSOLE", "TQDM_DISABLE"):
        env.pop(k, None)
    args = ["run", "--model", str(tiny_llama_dir), "--method", "wanda", "--ratio", "0.5", "--name", "console",
            "--device", "cpu",
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
                     "export", "report"], steps
    # stdout: the summary, short, with the figures, the checkpoint and how to load it
    assert len(out) <= 15, out
    assert "removed" in out[0] and "decoder-layer parameters" in out[0]
    ckpt = next(ln for ln in out if ln.startswith("checkpoint:")).split(":", 1)[1].strip()
    assert (Path(ckpt) / "config.json").is_file()
    assert any(ln.startswith("load it:") and ckpt in ln for ln in out)
    # `export: vllm` (the default) wrote the servable folder; uniform: the stock folder, no remote code
    served = Path(ckpt).parent / "servable-vllm"
    assert (served / "config.json").read_bytes() == (Path(ckpt) / "config.json").read_bytes()
    assert any(ln.startswith("serve it:") and f" {served} " in ln and ln.endswith("--host 127.0.0.1") for ln in out)
    assert any(ln.startswith("| ppl.fixed_window_32") for ln in out)
    log = home / "runs" / "console" / "pruneflow.log"
    text = log.read_text()
    assert "prefect" in text and "step prune" in text  # the full log is in the run's log file
