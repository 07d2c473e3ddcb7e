"""What a person at the terminal sees during `pruneflow run`: one progress bar per step, nothing else.

Each step gets a bar that ticks its elapsed time while it runs (layer-wise work — capture, a coupled
method's pruning, replacement training — adds its own per-layer / per-step bar underneath, from
`tasks/steps.py`) and ends as one line: `✓ prune      miss    16.3 s`. Prefect's, transformers' and
the libraries' records do not reach the console: they go to the run's log file (`_RunLog` in
`flows/compress.py`). Bars go to stderr; the summary (`flows/cli.py`) to stdout.

When stderr is not a terminal (`pruneflow run > log 2>&1`, CI), nothing is redrawn: each finished
step prints one line, the same one a bar ends as, and training prints a line per quarter of its steps
(`tasks.common.progress_lines`) — no carriage returns, as pip and Prefect do.

On only when the command line asks for it (`PRUNEFLOW_CONSOLE=1`, set by `pruneflow run`/`sweep`)
and not `--quiet`; flows run from Python or by a Prefect worker keep their usual logging.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
from contextlib import contextmanager


def enabled() -> bool:
    return os.environ.get("PRUNEFLOW_CONSOLE") == "1" and os.environ.get("PRUNEFLOW_QUIET") not in ("1", "true")


class _Ticker:
    """Refresh a bar twice a second so that its elapsed time moves while the step works."""

    def __init__(self, bar):
        self.bar, self.stop = bar, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(0.5):
            try:
                self.bar.refresh()
            except Exception:  # noqa: BLE001 - a closed stream must not kill the run
                return

    def close(self):
        self.stop.set()
        self.thread.join(timeout=2)


class _ToLog(io.TextIOBase):
    """What libraries print on stderr during a step (GGUF conversion bars, MLflow's "Created version"
    lines, artifact download bars) goes to the run's log, a line at a time."""

    def __init__(self):
        self.buf = ""
        self.log = logging.getLogger("pruneflow.stderr")

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.buf += text
        *lines, self.buf = self.buf.replace("\r", "\n").split("\n")
        for ln in lines:
            if ln.strip():
                self.log.info("%s", ln.strip())
        return len(text)


@contextmanager
def _stray_output_to_log():
    """Send sys.stderr to the log for the block; pruneflow's own bars keep the terminal
    (`tasks.common.console_stream`). Nested steps share the outermost redirection."""
    from tasks import common

    if common.CONSOLE_STREAM[0] is not None:
        yield
        return
    common.CONSOLE_STREAM[0] = sys.stderr
    try:
        with contextlib.redirect_stderr(_ToLog()):
            yield
    finally:
        common.CONSOLE_STREAM[0] = None


class StepBars:
    """`with bars.step("prune") as done: ...; done("miss")` — one bar per step."""

    width = 20  # the longest step name (evaluate_unrecovered)

    @contextmanager
    def step(self, name: str):
        if not enabled():
            yield lambda *a, **k: None
            return
        from tqdm.auto import tqdm

        from tasks.common import console_is_terminal, console_stream

        if not console_is_terminal():
            with self._line(name) as done:
                yield done
            return
        bar = tqdm(total=None, desc=f"  {name:<{self.width}}", bar_format="{desc} {elapsed}", leave=True,
                   file=console_stream(), position=0, dynamic_ncols=True)
        ticker = _Ticker(bar)
        outcome = {"status": "", "ok": True}

        def done(status: str = "") -> None:
            outcome["status"] = status

        try:
            with _stray_output_to_log():
                yield done
        except BaseException:
            outcome["ok"] = False
            raise
        finally:
            ticker.close()
            if outcome["ok"]:
                bar.set_description_str(f"✓ {name:<{self.width}} {outcome['status']:<8}", refresh=False)
                bar.refresh()
            else:  # the error's one line says what went wrong; the failed step's bar is cleared
                bar.leave = False
            bar.close()

    @contextmanager
    def _line(self, name: str):
        """A step on a stream that is not a terminal: one line once it has finished, nothing before."""
        import time

        from tqdm import tqdm

        from tasks.common import console_stream

        t0, outcome = time.monotonic(), {"status": ""}
        with _stray_output_to_log():
            yield lambda status="": outcome.__setitem__("status", status)
        line = f"✓ {name:<{self.width}} {outcome['status']:<8} {tqdm.format_interval(time.monotonic() - t0)}"
        stream = console_stream()
        stream.write(line.rstrip() + "\n")
        stream.flush()

    def begin(self, name: str) -> None:
        """A bar for work outside any step (Prefect's server starting), ended by `settle`."""
        self.settle()
        if enabled():
            cm = self.step(name)
            cm.__enter__()
            self._pending = cm

    def settle(self) -> None:
        cm, self._pending = getattr(self, "_pending", None), None
        if cm is not None:
            cm.__exit__(None, None, None)


BARS = StepBars()


class WarningLine(logging.Handler):
    """pruneflow's warnings on the console, one line each, printed above the bars (tqdm.write)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("warning: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            from tasks.common import console_stream

            tqdm.write(" ".join(self.format(record).split()), file=console_stream())
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)
