"""Races between runs and threads on the store and the process's model cache: each of these failed
before its fix (the threads runner's shared model cache, the local commit, the S3 lease takeover, the
objects of a killed S3 commit)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_one_threads_clear_models_leaves_another_threads_model_cached(monkeypatch):
    import pruning_core.models
    from tasks import common

    loads = []

    def fake_load(path, **kw):
        loads.append(path)
        return (object(), object())

    monkeypatch.setattr(pruning_core.models, "load_model", fake_load)
    # this test's own cache: what earlier tests' (possibly still running) threads hold is not its business
    monkeypatch.setattr(common, "_MODELS", {})
    monkeypatch.setattr(common, "_USERS", {})
    got, step = {}, threading.Barrier(2)

    def a():
        got["a1"] = common.load_model_cached("/m/dense", "float32", "cpu")
        step.wait()  # B loads another model and clears its own
        step.wait()
        got["a2"] = common.load_model_cached("/m/dense", "float32", "cpu")
        common.clear_models()

    def b():
        step.wait()
        got["b"] = common.load_model_cached("/m/other", "float32", "cpu")
        common.clear_models()
        step.wait()

    ts = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert got["a2"] is got["a1"]  # A's model was not dropped under it by B
    assert loads == ["/m/dense", "/m/other"]
    assert not common._MODELS  # once both let go, nothing is held


def test_a_model_held_only_by_ended_threads_is_dropped_at_the_next_clear(monkeypatch):
    """A step's thread that ended without letting go (a pool thread of a finished sweep) must not pin
    its model in memory for the rest of the process."""
    import pruning_core.models
    from tasks import common

    monkeypatch.setattr(pruning_core.models, "load_model", lambda path, **kw: (object(), object()))
    monkeypatch.setattr(common, "_MODELS", {})
    monkeypatch.setattr(common, "_USERS", {})
    t = threading.Thread(target=common.load_model_cached, args=("/m/left", "float32", "cpu"))
    t.start()
    t.join(30)
    assert len(common._MODELS) == 1  # held by the ended thread until somebody clears
    common.clear_models()
    assert not common._MODELS


def test_a_local_commit_never_deletes_a_live_writers_renamed_object(tmp_path, monkeypatch):
    """Writer A has renamed its object into place and is writing the marker; writer B of the same
    content must not take A's object for a dead writer's leftover (it used to delete and replace it)."""
    import tasks.store as store_mod

    st = store_mod.ArtifactStore(str(tmp_path / "store"))
    data = b"the same bytes" * 1000
    sha = store_mod.hashlib.sha256(data).hexdigest()
    final = Path(st._obj(sha))
    in_marker, go, seen = threading.Event(), threading.Event(), {}
    real = store_mod._atomic_write

    def slow_marker(path, payload):
        if threading.current_thread().name == "A" and path.name.endswith(".commit"):
            seen["inode"] = final.stat().st_ino  # A's object, just renamed into place
            in_marker.set()
            go.wait(30)
        real(path, payload)

    monkeypatch.setattr(store_mod, "_atomic_write", slow_marker)
    res = {}
    a = threading.Thread(target=lambda: res.setdefault("a", st.put_bytes(data, "x.bin", "stats", "A")), name="A")
    a.start()
    assert in_marker.wait(30)
    b = threading.Thread(target=lambda: res.setdefault("b", st.put_bytes(data, "x.bin", "stats", "B")), name="B")
    b.start()
    b.join(2.0)  # unlocked, B deleted A's object and renamed its own in its place meanwhile
    go.set()
    a.join(30)
    b.join(30)
    assert final.stat().st_ino == seen["inode"]
    assert res["a"]["uri"] == res["b"]["uri"] and st.read_bytes(res["a"]) == data
    assert not list(final.parent.glob(f"{store_mod.TMP_PREFIX}*"))  # B's copy went away


@pytest.mark.server
def test_s3_lease_takeover_has_exactly_one_winner(s3_env, monkeypatch):
    """Two waiters see the same expired lease at the same time: one takes it over, the other waits
    (delete-then-create let both in)."""
    import tasks.store as store_mod

    st = store_mod.ArtifactStore(s3_env)
    path = st._join("locks", "contested.json")
    st.fs.pipe_file(path, json.dumps({"owner": "dead-holder", "expires": time.time() - 5}).encode())
    both_saw_it, someone_inside, order = threading.Barrier(2), threading.Event(), []
    real_warning = store_mod.log.warning

    def warning(msg, *a):
        if "stopped renewing" in msg:
            try:
                both_saw_it.wait(10)
            except threading.BrokenBarrierError:
                pass
            order.append(threading.current_thread().name)
            if order[0] != threading.current_thread().name:
                someone_inside.wait(10)  # the second acts on what it read once the first holds the lock
        real_warning(msg, *a)

    monkeypatch.setattr(store_mod.log, "warning", warning)
    inside, most, guard = [0], [0], threading.Lock()

    def contender():
        with st.lock("contested"):
            someone_inside.set()
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(3)  # room for the other one to (wrongly) come in
            with guard:
                inside[0] -= 1

    ts = [threading.Thread(target=contender) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert most[0] == 1
    assert not st.fs.exists(path)  # the last holder released it


@pytest.mark.server
def test_objects_of_a_killed_s3_commit_are_collected_by_the_next_run(s3_env, tmp_path, monkeypatch):
    """A writer killed after uploading its objects and before its commit marker: the next run deletes them."""
    from tasks import cleanup, journal
    from tasks.store import ArtifactStore

    home = tmp_path / "home"
    monkeypatch.setenv("PRUNEFLOW_HOME", str(home))
    fault = tmp_path / "fault"
    env = {**os.environ, "PRUNEFLOW_FAULT": "commit:stats", "PRUNEFLOW_FAULT_FILE": str(fault),
           "PYTHONPATH": str(REPO), "PRUNEFLOW_WATCHDOG": "0"}
    code = ("import sys; from tasks.store import open_store; "
            "open_store(sys.argv[1]).put_bytes(b'orphan bytes' * 100, 's.bin', 'stats', 'test')")
    p = subprocess.Popen([sys.executable, "-c", code, s3_env], cwd=REPO, env=env)
    try:
        for _ in range(600):
            if fault.exists() or p.poll() is not None:
                break
            time.sleep(0.1)
        assert fault.exists(), "the writer never reached its commit"
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    st = ArtifactStore(s3_env)
    objects = st._join("objects")
    assert st.fs.find(objects)  # the uploaded, uncommitted object
    done = cleanup.reclaim(s3_env)
    st.fs.invalidate_cache()
    assert done["objects_dropped"] and not st.fs.find(objects)
    assert not list(journal.journal_dir().glob("*.json"))


def test_steps_on_one_shared_model_take_turns(tiny_llama_dir, pf_home, monkeypatch):
    """`sensitivity: kl` calibrates each table by pruning one projection of the shared model for a moment,
    and the engine hooks the model's modules and swaps its layers while it catches their inputs. A step
    running beside it on the same model (threads and Dask-threads runners) saw those changes, so a
    threaded sweep's checkpoints depended on timing. Steps on one shared model now take turns: the
    layer_tables step starts only once the step holding the model has ended, and that step never sees the
    model change."""
    import torch

    import pruning_core.search_tables as search_tables
    from tasks import common, steps

    ctx = {"store": str(pf_home / "artifacts"), "device": "cpu"}
    model = steps.load_model_task.fn(ctx=ctx, ref=str(tiny_llama_dir))
    calib = steps.calibration_task.fn(ctx=ctx, model=model, source="pydoc", n_samples=4, seq_len=32, seed=0)
    ids = torch.arange(1, 33).reshape(2, 16)
    ready, stop = threading.Event(), threading.Event()
    seen = {"forwards": 0, "changed": 0, "ended": None, "tables_started": None}
    real_build = search_tables.build_tables

    def build(*a, **kw):
        seen["tables_started"] = time.perf_counter()
        return real_build(*a, **kw)

    monkeypatch.setattr(search_tables, "build_tables", build)

    def other_step():  # what a capture or an evaluation does on another thread, on the same shared model
        with common.step_scope():
            m, _ = steps._open(model, ctx, "capture")
            with torch.no_grad():
                ref = m(input_ids=ids).logits
                ready.set()
                t0 = time.perf_counter()
                while not stop.is_set() and time.perf_counter() - t0 < 3.0:
                    seen["forwards"] += 1
                    seen["changed"] += not torch.equal(m(input_ids=ids).logits, ref)
            seen["ended"] = time.perf_counter()
        steps.clear_models()

    t = threading.Thread(target=other_step)
    t.start()
    try:
        assert ready.wait(60)
        settings = {"gqa": "per_group", "schedule": "search", "search": {"sensitivity": "kl", "kl_blocks": 2}}
        man = steps.layer_tables_task.fn(ctx=ctx, model=model, calib=calib, method="wanda", settings=settings)
    finally:
        stop.set()
        t.join(60)
    assert not man["hit"] and seen["forwards"] > 0
    assert seen["changed"] == 0, seen
    assert seen["tables_started"] >= seen["ended"], seen
