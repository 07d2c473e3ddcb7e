"""Host memory of the MLflow logging step (model registered) on an 8B-shaped bf16 checkpoint.

    .venv/bin/python benchmarks/bench_mlflow_rss.py [--shape 8b] [--layers 2] [--keep DIR]

A random bf16 Llama with 8B-shaped layers (hidden 4096 / FFN 14336 / 32 q / 8 kv heads, vocab 49152,
`bench_scale.write_random_llama`) is written as a checkpoint folder; a fresh process imports the
tracking module, takes its RSS as the baseline, resets the kernel's peak counter (`clear_refs`), logs
the run with `tracking.log_model: true` to a SQLite MLflow store and reads the peak (VmHWM). The
baseline is taken after the transformers flavour's modules are imported (the run's process has loaded
transformers before its tracking step); the figure from before those imports is printed beside it. The
checkpoint is copied as it is, never loaded: the peak stays within a few hundred MB of the baseline
whatever the model's size (it was ~2x the checkpoint's size in fp32 when the model was loaded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
for k, v in {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
             "MLFLOW_LOGGING_LEVEL": "ERROR"}.items():
    os.environ.setdefault(k, v)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(run_dir: str, uri: str) -> None:
    """Log one run with its model; print baseline and peak RSS (MB) as JSON."""
    from tasks.tracking import track_compress_run

    cold = _status_kb("VmRSS")
    # what the run's process has loaded before its tracking step (it ran models with transformers):
    # importing the transformers flavour's pipeline modules costs ~140 MB whatever the model's size
    import mlflow.transformers  # noqa: F401
    from transformers import pipelines  # noqa: F401

    base = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    spec = {"model": {"ref": "synthetic-8b"}, "method": {"name": "wanda"},
            "tracking": {"uri": uri, "on_failure": "fail", "log_model": True, "experiment": "rss"}}
    report = {"model": "synthetic-8b", "method": "wanda", "target_ratio": 0.2,
              "artifacts": {"checkpoint": str(Path(run_dir) / "checkpoint")}}
    res = track_compress_run(spec, report, run_dir)
    print(json.dumps({"status": res["status"], "version": res.get("model_version"),
                      "cold_mb": cold / 1024, "baseline_mb": base / 1024, "peak_mb": _status_kb("VmHWM") / 1024}))


def main() -> None:
    if sys.argv[1:2] == ["child"]:  # the measured process
        child(*sys.argv[2:4])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="8b", choices=("8b", "1536"))
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of the synthetic checkpoint")
    ap.add_argument("--keep", default=None, help="parent folder of the temporary checkpoint and MLflow store")
    a = ap.parse_args()
    from bench_scale import write_random_llama

    with tempfile.TemporaryDirectory(prefix="bench-mlflow-rss-", dir=a.keep) as tmp:
        run_dir = Path(tmp) / "run"
        weights = write_random_llama(run_dir / "checkpoint", a.shape, a.layers)
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        env = {**os.environ, "MLFLOW_ARTIFACTS_DESTINATION": str(Path(tmp) / "mlartifacts")}
        out = subprocess.run([sys.executable, __file__, "child", str(run_dir), uri], capture_output=True, text=True,
                             env=env, cwd=tmp)
        if out.returncode != 0:
            sys.exit(out.stderr[-3000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| checkpoint ({a.shape}, {a.layers} layers, bf16) | baseline RSS | peak RSS | peak - baseline "
              "| peak - RSS before the flavour's imports | status |")
        print("|---|---|---|---|---|---|")
        print(f"| {weights / 2**30:.2f} GiB of weights | {r['baseline_mb']:.0f} MB | {r['peak_mb']:.0f} MB "
              f"| **{r['peak_mb'] - r['baseline_mb']:.0f} MB** | {r['peak_mb'] - r['cold_mb']:.0f} MB "
              f"| {r['status']}, v{r['version']} |")


if __name__ == "__main__":
    main()
