"""The registered MLflow model version of a run with `export: vllm` carries the servable folder."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pruning_core.checkpoint import save_pruned
from pruning_core.export import export_checkpoint
from pruning_core.models import tiny_model
from pruning_core.plan import LayerPlan, PrunePlan
from pruning_core.surgery import apply_plan
from tasks.tracking import track_compress_run
from tests.tasks.test_tracking import SPEC, _pipeline_report, _tokenizer


def _run_dir(root: Path) -> Path:
    """A checkpoint with per-layer FFN widths (servable: same heads everywhere)."""
    plan = PrunePlan("l1", {"x": 1}, [LayerPlan(0, ffn=list(range(48))), LayerPlan(1, ffn=list(range(64)))])
    model = apply_plan(tiny_model("llama", n_layers=2), plan)
    run_dir = root / "run"
    save_pruned(model, _tokenizer(), plan, run_dir / "checkpoint")
    return run_dir


def test_registered_version_carries_the_servable_folder(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # models:/ URIs resolve through the registry
    run_dir = _run_dir(tmp_path)  # per-layer sizes: exported in vLLM's DeciLM format
    served = export_checkpoint(run_dir / "checkpoint", run_dir / "servable-vllm")
    assert served["layout"] == "decilm"
    report = _pipeline_report(run_dir, str(run_dir / "checkpoint" / "plan.json"), "miss")
    report["artifacts"]["servable_local"] = str(run_dir / "servable-vllm")
    res = track_compress_run({**SPEC, "tracking": {"uri": uri, "experiment": "t-serve"}}, report, run_dir)
    assert res["status"] == "ok", res
    name, version = res["model_name"], res["model_version"]
    assert res["servable_uri"] == f"models:/{name}/{version}/servable-vllm"
    c = MlflowClient(uri, uri)
    assert c.get_model_version(name, version).tags["pruneflow.servable"] == res["servable_uri"]
    got = Path(mlflow.artifacts.download_artifacts(res["servable_uri"], dst_path=str(tmp_path / "dl"),
                                                   tracking_uri=uri))
    want = run_dir / "servable-vllm"
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    assert json.loads((got / "config.json").read_text())["architectures"] == ["DeciLMForCausalLM"]
    assert (got / "model.safetensors").read_bytes() == (want / "model.safetensors").read_bytes()
