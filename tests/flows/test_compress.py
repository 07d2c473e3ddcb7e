"""The compress flow end to end on a tiny random Llama: local store, S3 (moto) store, cache hits."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from flows.compress import compress

COMPUTE_STEPS = ("load", "calibration", "capture", "score", "prune", "evaluate_dense", "evaluate")


def _check_report(rep: dict) -> None:
    assert rep["params_after"] < rep["params_before"]
    assert 0 < rep["removed_fraction"] < 1
    assert rep["metrics_before"]["ppl_protocol"] == "fixed_window_32"
    assert rep["metrics_after"]["ppl"] > 0
    assert set(COMPUTE_STEPS) <= set(rep["cache"])
    assert rep["cache"]["recover"] == "skipped"
    # which placement the evaluation used (perplexity layer-major off the device, lm-eval whole-model)
    assert rep["eval_placement"]["pruned"]["ppl"].startswith(("device", "offload", "disk"))


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


def test_corrupt_artifact_makes_its_step_recompute(prefect_harness, tiny_spec, pf_home, caplog):
    first = compress(spec=tiny_spec)
    from tasks import store as store_mod

    # corrupt the stored scores in place; forget what this process already verified
    scores_uri = Path(first["artifacts"]["score"])
    scores_uri.write_bytes(scores_uri.read_bytes()[:-7] + b"garbage")
    store_mod._STORES.clear()
    with caplog.at_level("WARNING"):
        second = compress(spec=tiny_spec)
    assert second["cache"]["score"] == "miss"
    assert second["cache"]["capture"] == "hit" and second["cache"]["calibration"] == "hit"
    assert any("missing or corrupt" in r.getMessage() or "recompute" in r.getMessage() for r in caplog.records)
    assert second["metrics_after"]["ppl"] == pytest.approx(first["metrics_after"]["ppl"])


@pytest.mark.server
def test_compress_on_s3_store(prefect_harness, tiny_spec, s3_env):
    spec = {**tiny_spec, "store": {"url": s3_env}}
    first = compress(spec=spec)
    _check_report(first)
    assert first["artifacts"]["checkpoint"].startswith(s3_env)
    assert first["artifacts"]["report"].startswith(s3_env)
    # a second run, from a process that has never seen these artifacts (fresh store objects)
    from tasks import store as store_mod

    store_mod._STORES.clear()
    second = compress(spec=spec)
    assert all(second["cache"][s] == "hit" for s in COMPUTE_STEPS), second["cache"]
    # the checkpoint in S3 is a committed, loadable HF folder
    from pruning_core.checkpoint import load_pruned
    from tasks.store import open_store

    st = open_store(s3_env)
    man = {"uri": first["artifacts"]["checkpoint"], "sha256": first["artifacts"]["checkpoint"].rsplit("/", 1)[1],
           "dir": True, "kind": "checkpoint", "name": "checkpoint"}
    model, tok = load_pruned(st.local_path(man))
    assert sum(p.numel() for p in model.parameters()) == first["params_after"]


def test_lora_recovery_is_its_own_cached_step(prefect_harness, tiny_spec, pf_home):
    spec = {**tiny_spec, "name": "tiny-lora",
            "recovery": {"kind": "lora", "settings": {"steps": 2, "batch_size": 2, "seq_len": 32, "rank": 2}}}
    first = compress(spec=spec)
    assert first["cache"]["recover"] == "miss"
    assert first["artifacts"]["recover"] != first["artifacts"]["prune"]  # new weights, new object
    assert first["params_after"] < first["params_before"]
    second = compress(spec=spec)
    assert second["cache"]["recover"] == "hit" and second["cache"]["evaluate"] == "hit"
