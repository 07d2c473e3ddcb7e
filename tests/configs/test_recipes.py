"""The recipes in configs/: each one's `pruneflow plan` runs from the model's config.json alone (meta
device: no weights, tokenizer, text or hub), and the sizes and memory it prints are the real model's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
GIB = 2**30
runner = CliRunner()

# published parameter counts (embeddings and an untied head included)
RECIPES = {
    "llama-3-8b": {"params": 8_030_261_248, "model_type": "llama", "placement": "auto"},
    "qwen2.5-7b": {"params": 7_615_616_512, "model_type": "qwen2", "placement": "auto"},
    "mistral-7b-v0.3": {"params": 7_248_023_552, "model_type": "mistral", "placement": "auto"},
    "llama-3-70b": {"params": 70_553_706_496, "model_type": "llama", "placement": "disk"},
}


@pytest.fixture
def big_box(monkeypatch):
    """A machine with 256 GiB free and a large disk, so that the plan's fit checks pass wherever the
    test runs (the figures checked here do not depend on it)."""
    from flows import dryrun
    from pruning_core import memory

    monkeypatch.setattr(memory, "free_memory", lambda device, cgroup_root=None: (256 * GIB, 256 * GIB))
    monkeypatch.setattr(dryrun, "_free_bytes", lambda path: (0, 2**50))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be fetched


def test_every_recipe_ships_its_config():
    assert sorted(p.name for p in CONFIGS.iterdir() if p.is_dir()) == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_plan_from_config_alone(name, pf_home, big_box):
    want = RECIPES[name]
    folder = CONFIGS / name
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == want["model_type"] and cfg["torch_dtype"] == "bfloat16"
    args = ["plan", str(folder / "recipe.yaml"), "--model-config", str(folder / "config.json")]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["model"].count("/") == 1  # the recipe's hub id, never downloaded
    assert out["total"]["params"] == want["params"]
    assert 0.75 < out["total"]["params_after"] / want["params"] < 0.9  # 20 % of the decoder layers' params
    assert out["dtype"] == "bfloat16" and out["weights"] == 2 * want["params"]
    peak = max(v["device"] + v["host"] for v in out["memory"].values())
    if want["placement"] == "disk":  # the layers streamed from disk: far less memory than the weights
        assert out["placement"] == "disk" and out["placement_reason"] == "requested"
        assert peak < out["weights"] / 3, peak / GIB
    else:  # auto, with room: the whole model resident, plus the steps' working set
        assert out["placement"] == "device"
        assert out["weights"] < peak < out["weights"] + 40 * GIB, peak / GIB

    text = runner.invoke(app, args)
    assert text.exit_code == 0, text.output
    gib = float(re.search(r"weights ([0-9.]+) GiB", text.stdout).group(1))
    assert abs(gib - 2 * want["params"] / GIB) < 0.01
    if name == "llama-3-8b":
        assert 15e9 < gib * GIB < 16.5e9  # 8 B parameters in bf16: ~16 GB
    assert f"placement {out['placement']}" in text.stdout
