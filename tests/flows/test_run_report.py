"""report.md, plots and MLflow of real (tiny) runs: every figure the run has, and nothing invented.

A LoRA run and an LLM-Streamline `layer` run (replacement trained in the recover step) through the
compress flow; both must leave the loss curve, the kept-per-layer and per-layer-ratio plots, the
protocol names that ran, and the same plots in the MLflow run. `recovery: none` trains nothing and
shares the prune step with `recovery: replacement`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.compress import compress

pytestmark = pytest.mark.usefixtures("one_thread")

PLOTS = ("recovery_loss.png", "kept_per_layer.png", "layer_ratios.png")


def _streamline(tiny_spec, pf_home, kind: str, **extra) -> dict:
    return {**tiny_spec, "name": f"tiny-streamline-{kind}",
            "method": {"name": "llm-streamline",
                       "settings": {"replacement": "layer", "n_layers": 1, "steps": 6, "batch_size": 2,
                                    "eval_every": 3, "warmup_steps": 1}},
            "recovery": {"kind": kind}, **extra}


def _md_and_plots(rep: dict) -> tuple[str, Path]:
    run_dir = Path(rep["artifacts"]["run_dir"])
    md = (run_dir / "report.md").read_text()
    for name in PLOTS:
        p = run_dir / "plots" / name
        assert p.is_file() and p.stat().st_size > 1000, name
        assert f"plots/{name}" in md, name
    assert "not drawn" not in md
    return md, run_dir


def _mlflow_plots(run_dir: Path, tracking: dict) -> set[str]:
    from mlflow.tracking import MlflowClient

    assert tracking.get("status") == "ok", tracking
    client = MlflowClient(tracking_uri=tracking["uri"])
    names = {Path(a.path).name for a in client.list_artifacts(tracking["run_id"], "plots")}
    top = {a.path for a in client.list_artifacts(tracking["run_id"])}
    assert "report.md" in top and "report.json" in top
    return names


def test_streamline_layer_run_trains_in_recover_and_reports_every_figure(prefect_harness, tiny_spec, pf_home):
    none = compress(spec=_streamline(tiny_spec, pf_home, "none"))
    assert none["cache"]["recover"] == "skipped" and "recovery_info" not in none  # nothing trained
    spec = _streamline(tiny_spec, pf_home, "replacement",
                       evaluation={"ppl_seq_len": 32, "ppl_windows": 4, "tasks": ["pydoc_next_sentence"], "limit": 6},
                       tracking={"enabled": True, "uri": f"sqlite:///{pf_home / 'mlflow.db'}"})
    rep = compress(spec=spec)
    # the prune step is shared with `recovery: none`: same cached checkpoint, then a separate recover step
    assert rep["cache"]["prune"] == "hit" and rep["artifacts"]["prune"] == none["artifacts"]["prune"]
    assert rep["cache"]["recover"] == "miss" and rep["artifacts"]["recover"] != rep["artifacts"]["prune"]
    info = rep["recovery_info"]
    assert info["kind"] == "replacement" and len(info["loss_curve"]) == 6
    assert info["val_mse_after"] <= info["val_mse_before"]
    # depth: one layer net removed (2 -> 1), rounding said, realised decoder fraction exact
    assert rep["layers"][0]["replacement"] == "layer" and not rep["layers"][1]["keep"]
    assert rep["removed_decoder_fraction"] == pytest.approx(0.5)
    assert "1 of 2 layers removed" in rep["rounding"]
    # lm-eval ran: stability is a fraction, and the protocols are the ones that ran
    assert 0.0 <= rep["stability"] <= 1.0
    assert rep["protocols"]["ppl"] == "fixed_window_32" and rep["protocols"]["pydoc_next_sentence"]
    md, run_dir = _md_and_plots(rep)
    assert "Stability" in md and "fixed_window_32" in md and "fixed_window_256" not in md
    assert "replacement (MSE" in md
    assert set(PLOTS) <= _mlflow_plots(run_dir, rep["tracking"])


def test_lora_run_reports_its_loss_curve(prefect_harness, tiny_spec, pf_home):
    spec = {**tiny_spec, "name": "tiny-lora-report",
            "recovery": {"kind": "lora", "settings": {"steps": 3, "batch_size": 2, "seq_len": 32, "rank": 2}}}
    rep = compress(spec=spec)
    assert len(rep["recovery_info"]["loss_curve"]) == 3
    md, run_dir = _md_and_plots(rep)
    assert "LoRA (LM loss)" in md
    # per-layer view: wanda per_group at 0.5 on 4 q / 2 KV heads keeps 1 query head per group
    assert [lp["heads"] for lp in rep["layers"]] == [2, 2]
    assert all(0 < lp["ratio"] < 1 for lp in rep["layers"])
    on_disk = json.loads((run_dir / "report.json").read_text())
    assert on_disk["recovery_info"]["loss_curve"] == rep["recovery_info"]["loss_curve"]
