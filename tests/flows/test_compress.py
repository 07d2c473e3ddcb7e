"""The compress flow end to end on a tiny random Llama: local store, S3 (moto) store, cache hits."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flows.compress import compress

COMPUTE_STEPS = ("load", "calibration", "capture", "score", "prune", "evaluate_dense", "evaluate")


def _check_report(rep: dict) -> None:
    assert rep["params_after"] < rep["params_before"]
    assert 0 < rep["removed_fraction"] < 1
    assert rep["metrics_before"]["ppl_protocol"] == "fixed_window_32"
    assert rep["metrics_after"]["ppl"] > 0
    assert set(COMPUTE_STEPS) <= set(rep["cache"])
    assert rep["cache"]["recover"] == "skipped"


def test_compress_twice_local_second_is_all_cache_hits(prefect_harness, tiny_spec, pf_home):
    t0 = time.perf_counter()
    first = compress(spec=tiny_spec)
    t1 = time.perf_counter()
    second = compress(spec=tiny_spec)
    t2 = time.perf_counter()
    _check_report(first)
    assert all(first["cache"][s] == "miss" for s in COMPUTE_STEPS), first["cache"]
    assert all(second["cache"][s] == "hit" for s in COMPUTE_STEPS), second["cache"]
    # same results, same artifacts
    assert second["metrics_after"] == first["metrics_after"]
    assert second["artifacts"]["checkpoint"] == first["artifacts"]["checkpoint"]
    # report.json beside the checkpoint link, in the run folder
    run_dir = Path(first["artifacts"]["run_dir"])
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["cache"] == second["cache"]
    assert (run_dir / "checkpoint" / "config.json").exists()
    assert (run_dir / "checkpoint" / "plan.json").exists()
    print(f"first run {t1 - t0:.2f} s, second run {t2 - t1:.2f} s")
    assert sum(second["timings"][s] for s in COMPUTE_STEPS) < sum(first["timings"][s] for s in COMPUTE_STEPS)
