"""The sweep flow: 3 ratios, capture and scores computed once and reused."""

from __future__ import annotations

from flows.sweep import run_sweep


def test_sweep_three_ratios_computes_capture_and_score_once(prefect_harness, tiny_spec, pf_home):
    res = run_sweep(tiny_spec, ["wanda"], [0.2, 0.4, 0.6], "sequential")
    c = res["step_counts"]
    assert c["capture"] == {"miss": 1, "hit": 0}
    assert c["score"] == {"miss": 1, "hit": 0}
    assert c["prune"] == {"miss": 3, "hit": 0}
    assert c["evaluate"] == {"miss": 3, "hit": 0}
    assert c["evaluate_dense"] == {"miss": 1, "hit": 0}
    rows = sorted(res["rows"], key=lambda r: r["ratio"])
    assert [r["ratio"] for r in rows] == [0.2, 0.4, 0.6]
    # more removed at a higher ratio, three distinct checkpoints
    assert rows[0]["params_after"] > rows[1]["params_after"] > rows[2]["params_after"]
    assert len({r["checkpoint"] for r in rows}) == 3
    # exactly one stats and one scores object in the store
    objs = list((pf_home / "artifacts" / "index").glob("*/*.json"))
    by_step = {}
    for o in objs:
        by_step[o.parent.name] = by_step.get(o.parent.name, 0) + 1
    assert by_step["capture"] == 1 and by_step["score"] == 1 and by_step["prune"] == 3


def test_sweep_on_a_dask_cluster_reuses_the_cache(prefect_harness, tiny_spec, pf_home, monkeypatch):
    """Branches submitted to a (local, threaded) Dask cluster through prefect-dask; a rerun with one
    more ratio computes only the new branch."""
    monkeypatch.setenv("PRUNEFLOW_DASK_PROCESSES", "0")
    monkeypatch.setenv("PRUNEFLOW_DASK_WORKERS", "2")
    first = run_sweep(tiny_spec, ["l2"], [0.2, 0.4], "dask")
    assert first["step_counts"]["prune"] == {"miss": 2, "hit": 0}
    # one more ratio and one more method: l2's branches and the shared capture come from cache
    second = run_sweep(tiny_spec, ["l2", "wanda"], [0.2, 0.4, 0.6], "dask")
    c = second["step_counts"]
    assert c["capture"] == {"miss": 0, "hit": 2}  # wanda and l2 need the same statistics
    assert c["score"] == {"miss": 1, "hit": 1}
    assert c["prune"] == {"miss": 4, "hit": 2}
    assert len(second["rows"]) == 6


def test_the_sweep_flow_runs_preflight_before_any_step(prefect_harness, tiny_spec, pf_home, tmp_path):
    """A deployment's sweep has not been through the command line's checks: the flow runs them itself
    (a missing text, a ratio a depth method cannot reach) before a step is computed."""
    import pytest

    from flows.sweep import sweep
    from pruning_core.errors import ConfigError, DataError

    bad = {**tiny_spec, "calibration": {**tiny_spec["calibration"], "source": str(tmp_path / "absent.txt")}}
    with pytest.raises(DataError, match="calibration.source"):
        sweep.fn(spec=bad, methods=["wanda"], ratios=[0.2])
    with pytest.raises(ConfigError, match="ratio"):
        sweep.fn(spec=tiny_spec, methods=["shortgpt"], ratios=[0.2, 0.9])
    assert not (pf_home / "artifacts" / "index").exists()  # nothing was computed
