"""`recovery: distill` in the flows: the teacher is one cached artifact, shared by every method and ratio of a
sweep, and the student's loss is computed from exactly the stored values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flows.compress import compress
from flows.sweep import run_sweep
from pruning_core.distill import kl_loss
from pruning_core.errors import ConfigError
from tasks.store import open_store

DISTILL = {"kind": "distill", "settings": {"steps": 3, "batch_size": 2, "top_k": None, "teacher_dtype": "float32",
                                            "lr": 1e-3, "seed": 3}}


def _records(pf_home: Path, step: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in (pf_home / "artifacts" / "index" / step).glob("*.json")]


def _manifest(pf_home: Path, step: str, uri: str) -> dict:
    return next(r for r in _records(pf_home, step) if r["uri"] == uri)


def _tensors(pf_home: Path, store_url: str, step: str, uri: str) -> dict:
    return load_file(str(open_store(store_url).local_path(_manifest(pf_home, step, uri))))


@torch.no_grad()
def _logits(folder, ids):
    from pruning_core.checkpoint import load_pruned

    model, _ = load_pruned(folder)
    return model(input_ids=ids).logits.float()


def test_distill_run_learns_from_exactly_the_stored_teacher(prefect_harness, tiny_spec, pf_home, tiny_llama_dir):
    rep = compress(spec={**tiny_spec, "ratio": 0.4, "recovery": DISTILL})
    assert rep["cache"]["teacher"] == "miss" and rep["cache"]["recover"] == "miss"
    store = rep["store"]
    blocks = _tensors(pf_home, store, "calibration", rep["artifacts"]["calibration"])["input_ids"]
    teacher = _tensors(pf_home, store, "teacher", rep["artifacts"]["teacher"])
    # k = vocabulary: the stored values are the dense model's own log-probs over the calibration blocks
    dense = torch.log_softmax(_logits(tiny_llama_dir, blocks), -1)
    assert teacher["indices"].shape == (*blocks.shape, dense.shape[-1])
    assert torch.allclose(dense.gather(-1, teacher["indices"].long()), teacher["values"], atol=1e-5)
    # the first step's loss is kl_loss(the pruned student on the first batch, the stored values of that batch)
    info = rep["recovery_info"]
    g = torch.Generator().manual_seed(DISTILL["settings"]["seed"])
    idx = torch.randperm(blocks.shape[0], generator=g)[:2]
    pruned = open_store(store).local_path(_manifest(pf_home, "prune", rep["artifacts"]["prune"]))
    first = kl_loss(_logits(pruned, blocks[idx]), teacher["indices"][idx], teacher["values"][idx])
    assert abs(float(first) - info["kl_curve"][0]) < 1e-6
    assert info["teacher_uri"] == rep["artifacts"]["teacher"] and info["tokens_seen"] == 3 * 2 * blocks.shape[1]
    report_md = (Path(rep["artifacts"]["run_dir"]) / "report.md").read_text()
    assert "distillation (KL to the dense model" in report_md and "MiB on disk" in report_md
    # the rerun is all cache hits
    again = compress(spec={**tiny_spec, "ratio": 0.4, "recovery": DISTILL})
    assert again["cache"]["teacher"] == "hit" and again["cache"]["recover"] == "hit"
    # the pruned model is evaluated before its recovery too (a column of the console's and the report's
    # table): the same step, key and figures as a run without recovery, whose evaluation is then a hit
    assert again["cache"]["evaluate_unrecovered"] == "hit"
    before = rep["metrics_before_recovery"]
    assert before["ppl"] != rep["metrics_after"]["ppl"] and "before recovery" in report_md
    none = compress(spec={**tiny_spec, "ratio": 0.4})
    assert none["cache"]["evaluate"] == "hit" and none["metrics_after"] == before
    assert "metrics_before_recovery" not in none
    from flows.cli import summary

    head = [c.strip() for c in summary(rep).splitlines()[1].strip("| ").split("|")]
    assert head == ["metric", "dense", "pruned, no distill", "+ distill", "retention"]


def test_sweep_computes_the_teacher_once_for_every_method_and_ratio(prefect_harness, tiny_spec, pf_home):
    res = run_sweep({**tiny_spec, "recovery": DISTILL}, ["wanda", "l2"], [0.2, 0.4], "sequential")
    c = res["step_counts"]
    assert c["teacher"] == {"miss": 1, "hit": 3}, c  # hit by the second ratio and by the second method
    assert c["recover"] == {"miss": 4, "hit": 0}
    [teacher] = _records(pf_home, "teacher")
    recovers = _records(pf_home, "recover")
    assert len(recovers) == 4
    uris = {json.dumps(r, sort_keys=True).split('"teacher_uri": "')[1].split('"')[0] for r in recovers}
    assert len(uris) == 1 and uris.pop() in json.dumps(teacher)


def test_teacher_samples_are_a_cached_step_the_teacher_is_computed_on(prefect_harness, tiny_spec, pf_home,
                                                                       tiny_llama_dir):
    """`source: teacher-samples`: the distillation blocks are the dense model's own samples (its step,
    keyed by the model and the sampling settings, not by any text), the teacher's log-probs are taken
    over exactly those blocks, and a second ratio reuses both."""
    from pruning_core.checkpoint import load_pruned
    from pruning_core.distill import sample_from_teacher

    rec = {"kind": "distill", "settings": {**DISTILL["settings"], "source": "teacher-samples", "n_blocks": 3,
                                           "sample_batch_size": 2}}
    rep = compress(spec={**tiny_spec, "ratio": 0.4, "recovery": rec})
    assert rep["cache"]["distill_data"] == "miss" and rep["cache"]["teacher"] == "miss"
    store = rep["store"]
    [samples] = _records(pf_home, "teacher_samples")
    blocks = load_file(str(open_store(store).local_path(samples)))["input_ids"]
    dense, _ = load_pruned(tiny_llama_dir)
    want = sample_from_teacher(dense, 3, tiny_spec["calibration"]["seq_len"], seed=tiny_spec["calibration"]["seed"],
                               batch_size=2)
    assert torch.equal(blocks, want)
    teacher = _tensors(pf_home, store, "teacher", rep["artifacts"]["teacher"])
    assert teacher["indices"].shape[:2] == blocks.shape
    assert torch.allclose(torch.log_softmax(_logits(tiny_llama_dir, blocks), -1).gather(-1, teacher["indices"].long()),
                          teacher["values"], atol=1e-5)
    again = compress(spec={**tiny_spec, "ratio": 0.5, "recovery": rec})
    assert again["cache"]["distill_data"] == "hit" and again["cache"]["teacher"] == "hit"
    assert again["cache"]["recover"] == "miss"
    other = compress(spec={**tiny_spec, "ratio": 0.5, "recovery": {**rec, "settings": {**rec["settings"],
                                                                                     "sample_temperature": 0.7}}})
    assert other["cache"]["distill_data"] == "miss" and other["cache"]["teacher"] == "miss"


def test_mixed_text_is_the_calibration_blocks_then_the_dense_models_samples(prefect_harness, tiny_spec, pf_home,
                                                                             tiny_llama_dir):
    """`mix_samples: N`: the training blocks are the calibration's, then N samples of the dense model (its
    cached step); the teacher is taken over exactly that concatenation, and a rerun hits all three steps."""
    from pruning_core.checkpoint import load_pruned
    from pruning_core.distill import sample_from_teacher

    rec = {"kind": "distill", "settings": {**DISTILL["settings"], "mix_samples": 3, "sample_batch_size": 2}}
    rep = compress(spec={**tiny_spec, "ratio": 0.4, "recovery": rec})
    assert [rep["cache"][k] for k in ("distill_samples", "distill_mix", "teacher")] == ["miss"] * 3
    assert "distill_data" not in rep["cache"]  # the calibration blocks themselves: no step of their own
    store = rep["store"]
    calib = _tensors(pf_home, store, "calibration", rep["artifacts"]["calibration"])["input_ids"]
    mixed = _tensors(pf_home, store, "concat_blocks", rep["artifacts"]["distill_mix"])["input_ids"]
    dense, _ = load_pruned(tiny_llama_dir)
    samples = sample_from_teacher(dense, 3, calib.shape[1], seed=tiny_spec["calibration"]["seed"], batch_size=2)
    assert torch.equal(mixed, torch.cat([calib, samples]))
    teacher = _tensors(pf_home, store, "teacher", rep["artifacts"]["teacher"])
    assert teacher["indices"].shape[:2] == mixed.shape
    assert rep["recovery_info"]["teacher_uri"] == rep["artifacts"]["teacher"]
    again = compress(spec={**tiny_spec, "ratio": 0.5, "recovery": rec})
    assert [again["cache"][k] for k in ("distill_samples", "distill_mix", "teacher")] == ["hit"] * 3
    with pytest.raises(ConfigError, match="recovery.settings.mix_samples"):
        compress(spec={**tiny_spec, "recovery": {"kind": "distill", "settings": {"mix_samples": 2,
                                                                                 "source": "teacher-samples"}}})


def test_distill_is_refused_before_any_step_where_it_cannot_run(tiny_spec):
    from flows.preflight import preflight
    from flows.spec import build_spec, validate

    with pytest.raises(ConfigError, match="model.placement"):
        preflight(validate({**tiny_spec, "model": {**tiny_spec["model"], "placement": "disk"}, "recovery": DISTILL}))
    with pytest.raises(Exception, match="recovery.settings.source"):  # pkgdocs is evaluation-only
        preflight(validate({**tiny_spec, "recovery": {"kind": "distill", "settings": {"source": "pkgdocs"}}}))
    with pytest.raises(ConfigError, match="recovery.settings.train"):
        build_spec(None, ["recovery.kind=distill", "recovery.settings.train=all"])


def test_plan_estimates_the_teachers_size(tiny_spec):
    from flows.dryrun import dry_run
    from flows.spec import validate

    res = dry_run(validate({**tiny_spec, "recovery": {"kind": "distill", "settings": {"top_k": 16, "n_blocks": 6}}}))
    c = tiny_spec["calibration"]
    assert res["teacher"] == {"tokens": 6 * c["seq_len"], "top_k": 16, "source": "pydoc", "train": "decoder",
                              "bytes": 6 * c["seq_len"] * 16 * 6}
    mixed = dry_run(validate({**tiny_spec, "recovery": {"kind": "distill", "settings": {"top_k": 16, "n_blocks": 6,
                                                                                       "mix_samples": 4}}}))
    assert mixed["teacher"]["tokens"] == 10 * c["seq_len"]
