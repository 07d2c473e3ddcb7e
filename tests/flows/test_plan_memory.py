"""`pruneflow plan`: estimated peak device / host memory per step for the chosen placement, and a
one-line refusal (exit 2) when a step cannot fit."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()
STEPS = {"capture", "score", "prune", "evaluate"}


def test_plan_prints_memory_per_step_and_placement(tiny_llama_dir, pf_home):
    res = runner.invoke(app, ["plan", "--model", str(tiny_llama_dir), "--json", "--set", "model.placement=disk"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["placement"] == "disk" and set(out["memory"]) == STEPS
    dense = runner.invoke(app, ["plan", "--model", str(tiny_llama_dir), "--json", "--set", "model.placement=device"])
    dev = json.loads(dense.stdout)
    # the decoder layers' weights are resident under device, one layer under disk
    from transformers import AutoConfig

    from pruning_core.placement import param_bytes

    sizes = param_bytes(AutoConfig.from_pretrained(tiny_llama_dir), torch.float32)
    gap = dev["memory"]["capture"]["host"] - out["memory"]["capture"]["host"]
    assert gap == sizes["total"] - sizes["other"] - sizes["layer_max"]
    text = runner.invoke(app, ["plan", "--model", str(tiny_llama_dir), "--set", "model.placement=disk"])
    assert "placement disk (requested)" in text.stdout and "peak host GiB" in text.stdout


@pytest.mark.parametrize("placement", ["device", "auto"])
def test_plan_refuses_a_step_that_cannot_fit(tiny_llama_dir, pf_home, monkeypatch, placement):
    import pruning_core.placement as pl

    monkeypatch.setattr(pl, "free_memory", lambda device: (10 * 2**20, 10 * 2**20))  # 10 MiB free
    res = runner.invoke(app, ["plan", "--model", str(tiny_llama_dir), "--set", f"model.placement={placement}"])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert "\n" not in err and "model.placement" in err and "step capture" in err and "GiB free" in err, err
