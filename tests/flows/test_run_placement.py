"""The run's placement is chosen once, by the flow, and every model step — the dense and the pruned
evaluation included — runs under it; the report records it. `auto` reads host memory within the
container's cgroup limit (a fake cgroup v2 here), after the models cached by a previous run are dropped."""

from __future__ import annotations

import pytest

from flows.compress import compress

pytestmark = pytest.mark.usefixtures("one_thread")


def _cgroup_v2(root, limit: int, current: int = 0):
    root.mkdir(parents=True, exist_ok=True)
    (root / "memory.max").write_text(f"{limit}\n")
    (root / "memory.current").write_text(f"{current}\n")
    (root / "memory.stat").write_text("inactive_file 0\n")
    return root


def _spy_placements(monkeypatch) -> list[tuple[str, str]]:
    """(step path, placement) of every model the steps open."""
    from tasks import steps

    seen: list[tuple[str, str]] = []
    cached, opened = steps.load_model_cached, steps._placement

    def load_model_cached(path, *a, placement="device", **kw):
        seen.append((str(path), placement))
        return cached(path, *a, placement=placement, **kw)

    def _placement(ctx, path, *a, **kw):
        got = opened(ctx, path, *a, **kw)
        seen.append((str(path), got))
        return got

    monkeypatch.setattr(steps, "load_model_cached", load_model_cached)
    monkeypatch.setattr(steps, "_placement", _placement)
    return seen


def test_auto_is_chosen_once_from_the_cgroup_limit_and_used_by_every_step(prefect_harness, tiny_spec, tmp_path,
                                                                         monkeypatch):
    from pruning_core import memory
    from tasks import common

    # a model left cached by an earlier run of this process is dropped before the choice
    common._MODELS[("stale",)] = (object(), None)
    common._USERS[("stale",)] = set()
    monkeypatch.setattr(memory, "CGROUP_ROOT", _cgroup_v2(tmp_path / "cg", 64 * 2**20))  # a 64 MiB pod
    seen = _spy_placements(monkeypatch)
    rep = compress(spec={**tiny_spec, "evaluation": {**tiny_spec["evaluation"], "efficiency": False}})
    assert ("stale",) not in common._MODELS
    pl = rep["placement"]
    assert pl["requested"] == "auto" and pl["placement"] == "disk", pl  # the node has GiBs; the pod has not
    assert pl["host_memory_source"] == "cgroup" and pl["free_memory"]["host"] == 64 * 2**20
    assert pl["working_set"] > 0 and set(pl["memory"]) >= {"capture", "prune", "evaluate"}
    # every model step (capture, score, prune, the dense and the pruned evaluation) under the run's placement
    assert {p for _, p in seen} == {"disk"}, seen
    paths = {path for path, _ in seen}
    assert any(rep["artifacts"]["checkpoint"] in p or p == rep["artifacts"]["checkpoint"] for p in paths)

    # the node's memory when the cgroup has no limit: the same run is placed on the device
    (tmp_path / "cg" / "memory.max").write_text("max\n")
    seen.clear()
    rep2 = compress(spec={**tiny_spec, "name": "tiny-unlimited"})
    assert rep2["placement"]["placement"] == "device" and rep2["placement"]["host_memory_source"] == "node"
    assert {p for _, p in seen} <= {"device"}
