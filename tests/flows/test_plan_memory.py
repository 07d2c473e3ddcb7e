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
    # the decoder layers' weights are resident under device; under disk one layer + the next one, which
    # the engine reads ahead while the current one runs
    from transformers import AutoConfig

    from pruning_core.memory import param_bytes

    sizes = param_bytes(AutoConfig.from_pretrained(tiny_llama_dir), torch.float32)
    gap = dev["memory"]["capture"]["host"] - out["memory"]["capture"]["host"]
    assert gap == sizes["total"] - sizes["other"] - 2 * sizes["layer_max"]
    text = runner.invoke(app, ["plan", "--model", str(tiny_llama_dir), "--set", "model.placement=disk"])
    assert "placement disk (requested)" in text.stdout and "peak host GiB" in text.stdout


@pytest.mark.parametrize("placement", ["device", "auto"])
def test_plan_refuses_a_step_that_cannot_fit(tiny_llama_dir, pf_home, monkeypatch, placement):
    import pruning_core.memory as pl

    monkeypatch.setattr(pl, "free_memory", lambda device: (10 * 2**20, 10 * 2**20))  # 10 MiB free
    res = runner.invoke(app, ["plan", "--model", str(tiny_llama_dir), "--set", f"model.placement={placement}"])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert "\n" not in err and "model.placement" in err and "step capture" in err and "GiB free" in err, err


def test_plan_estimates_disk_spill_scratch_and_store(tiny_llama_dir, pf_home, tmp_path, monkeypatch):
    """Disk placement with a method that rewrites layers spills every decoder layer to $PRUNEFLOW_SCRATCH;
    the store keeps the pruned checkpoint; device placement spills nothing."""
    from transformers import AutoConfig

    from pruning_core.memory import param_bytes

    monkeypatch.setenv("PRUNEFLOW_SCRATCH", str(tmp_path / "scratch"))
    args = ["plan", "--model", str(tiny_llama_dir), "--method", "slimgpt", "--set", "export=none", "--json"]
    disk = json.loads(runner.invoke(app, [*args, "--set", "model.placement=disk"]).stdout)["disk"]["places"]
    dev = json.loads(runner.invoke(app, [*args, "--set", "model.placement=device"]).stdout)["disk"]["places"]
    sizes = param_bytes(AutoConfig.from_pretrained(tiny_llama_dir), torch.float32)
    assert disk["spill"] == {"path": str(tmp_path / "scratch"), "bytes": sizes["layers"]}
    assert dev["spill"]["bytes"] == 0
    # the pruned checkpoint only (slimgpt: no capture stats; export=none: no servable copy)
    assert 0 < disk["store"]["bytes"] < sizes["total"]
    text = runner.invoke(app, [*args[:-1], "--set", "model.placement=disk"]).stdout
    assert "disk (est.)" in text and str(tmp_path / "scratch") in text


def test_plan_refuses_when_the_disk_cannot_hold_the_run(tiny_llama_dir, pf_home, tmp_path, monkeypatch):
    import flows.dryrun as dr

    monkeypatch.setenv("PRUNEFLOW_SCRATCH", str(tmp_path / "scratch"))
    real = dr._free_bytes
    monkeypatch.setattr(dr, "_free_bytes", lambda p: (real(p)[0], 1000))  # 1000 bytes free everywhere
    res = runner.invoke(app, ["plan", "--model", str(tiny_llama_dir), "--method", "slimgpt",
                              "--set", "model.placement=disk"])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert "\n" not in err and "spill" in err and "store" in err and "GiB are free" in err, err
    assert err.split(":", 2)[1].strip() in ("store.url", "PRUNEFLOW_SCRATCH", "TMPDIR"), err
