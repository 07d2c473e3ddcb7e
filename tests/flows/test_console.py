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


def _cli_env(home: Path, tmp_path: Path) -> dict:
    env = {**os.environ, "PRUNEFLOW_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PREFECT_HOME": str(tmp_path / "prefect")}
    for k in ("PREFECT_API_URL", "PRUNEFLOW_QUIET", "PRUNEFLOW_CONSOLE", "TQDM_DISABLE"):
        env.pop(k, None)
    return env


def test_run_console_is_bars_and_a_short_summary(tiny_llama_dir, tmp_path):
    home = tmp_path / "home"
    env = _cli_env(home, tmp_path)
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


def test_run_console_in_a_log_file_has_one_line_per_step(tiny_llama_dir, tmp_path):
    """`pruneflow run > log 2>&1`: stderr is not a terminal, so nothing is redrawn: no carriage return,
    each finished step one line (the line a bar ends as), then the summary."""
    home = tmp_path / "home"
    env = _cli_env(home, tmp_path)
    args = ["run", "--model", str(tiny_llama_dir), "--method", "slimgpt", "--ratio", "0.5", "--name", "logfile",
            "--device", "cpu", "--set", "recovery.kind=lora", "--set", "recovery.settings.steps=8",
            "--set", "calibration.n_samples=4", "--set", "calibration.seq_len=32", "--set", "evaluation.tasks=[]",
            "--set", "evaluation.ppl_seq_len=32", "--set", "evaluation.ppl_windows=2", "--set", "tracking.enabled=false"]
    log = tmp_path / "log"
    with open(log, "wb") as f:
        r = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, stdout=f,
                           stderr=subprocess.STDOUT, timeout=900)
    raw = log.read_bytes().decode()
    assert r.returncode == 0, raw[-2000:]
    assert "\r" not in raw and "\x1b" not in raw
    lines = raw.splitlines()
    steps = [ln.split()[1] for ln in lines if ln.startswith("✓ ")]
    assert steps == ["prefect", "load", "calibration", "prune", "recover", "evaluate_unrecovered", "evaluate",
                     "evaluate_dense", "export", "report"], lines  # export: the default run ends with its servable-vllm folder
    # LoRA's training: a line per quarter of its steps, before the recover step's line
    milestones = [ln for ln in lines if ln.startswith("  lora: step ")]
    assert [m.split()[2] for m in milestones] == ["2/8", "4/8", "6/8", "8/8"], lines
    assert lines.index(milestones[-1]) < next(i for i, ln in enumerate(lines) if ln.startswith("✓ recover"))
    assert any(ln.startswith("checkpoint:") for ln in lines)


class _Stream:
    """stderr as a terminal (`tty=True`) or as a file."""

    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass


def test_step_bars_redraw_on_a_terminal_and_print_one_line_per_step_elsewhere(monkeypatch):
    from flows.console import StepBars
    from tasks.common import progress_lines

    monkeypatch.setenv("PRUNEFLOW_CONSOLE", "1")
    monkeypatch.delenv("PRUNEFLOW_QUIET", raising=False)
    out = {}
    for tty in (True, False):
        stream = _Stream(tty)
        monkeypatch.setattr(sys, "stderr", stream)
        bars = StepBars()
        with bars.step("prune") as done:
            done("miss")
        with bars.step("recover"):
            cb = progress_lines("lora", "step")
            for k in range(1, 9):
                cb(k, 8, 0.5)
        out[tty] = stream.text
    assert "\r" in out[True]
    assert "\r" not in out[False] and "\x1b" not in out[False]
    lines = out[False].splitlines()
    assert [ln.split()[:3] for ln in lines if ln.startswith("✓")] == [["✓", "prune", "miss"], ["✓", "recover", "00:00"]]
    assert [ln.split()[2] for ln in lines if ln.startswith("  lora")] == ["2/8", "4/8", "6/8", "8/8"]
