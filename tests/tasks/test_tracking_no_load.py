"""MLflow logs a checkpoint folder as it is: the model is never loaded to be registered (an 8B bf16
checkpoint in fp32 needed ~32 GB of host memory; `benchmarks/bench_mlflow_rss.py` measures the peak)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def _refuse(*_a, **_k):
    raise AssertionError("the model was loaded to be logged")


def test_logging_a_uniform_checkpoint_never_loads_the_model(tmp_path, tiny_llama_dir, monkeypatch, pf_home):
    import mlflow
    import transformers

    import pruning_core.checkpoint
    import pruning_core.loading
    from tasks.tracking import track_compress_run

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_llama_dir, run_dir / "checkpoint")
    monkeypatch.setattr(pruning_core.checkpoint, "load_pruned", _refuse)
    monkeypatch.setattr(pruning_core.loading, "open_model", _refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(_refuse))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _refuse)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = {"model": {"ref": "tiny"}, "method": {"name": "wanda"},
            "tracking": {"uri": uri, "on_failure": "fail", "experiment": "no-load"}}
    report = {"model": "tiny", "method": "wanda", "target_ratio": 0.2,
              "artifacts": {"checkpoint": str(run_dir / "checkpoint")}}
    res = track_compress_run(spec, report, run_dir)
    assert res["status"] == "ok" and res["model_version"] == "1", res
    # the registered model holds the checkpoint's own bytes
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    got = Path(mlflow.artifacts.download_artifacts(res["model_uri"], dst_path=str(tmp_path / "dl")))
    logged = [p for p in got.rglob("*.safetensors")]
    assert len(logged) == 1 and logged[0].read_bytes() == (tiny_llama_dir / "model.safetensors").read_bytes()


@pytest.mark.parametrize("log_model", [True, False])
def test_log_model_is_a_spec_field(log_model):
    from flows.spec import RunSpec
    from tasks.tracking import TrackingSettings

    spec = RunSpec.model_validate({"tracking": {"log_model": log_model}})
    assert TrackingSettings.from_spec(spec.model_dump(mode="json")).log_model is log_model
