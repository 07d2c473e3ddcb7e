"""Model sources: a hub id resolved offline from a populated Hugging Face cache (revision -> commit sha
in the cache key), through `pruneflow run --model org/name`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()
SHA_A = "a" * 40
SHA_B = "b" * 40


def _hub_cache(root: Path, repo: str, src: Path, sha: str, ref: str = "main") -> Path:
    """The layout huggingface_hub keeps: models--org--name/{refs/<ref>, snapshots/<sha>/files}."""
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / sha
    snap.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, snap / f.name)
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / ref).write_text(sha)
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return root


def test_hub_id_resolves_offline_to_the_cached_snapshot(hub, tiny_llama_dir):
    from pruning_core.errors import DataError
    from pruning_core.models import resolve_source

    snap = _hub_cache(hub, "org/tiny", tiny_llama_dir, SHA_A)
    assert resolve_source("org/tiny") == (str(snap), SHA_A)
    assert resolve_source("org/tiny", SHA_A) == (str(snap), SHA_A)
    with pytest.raises(DataError) as e:
        resolve_source("org/tiny", "v2")
    msg = str(e.value)
    assert "\n" not in msg and "org/tiny@v2" in msg and "HF_HUB_OFFLINE" in msg
    with pytest.raises(DataError):
        resolve_source("org/absent")


def test_pruneflow_run_with_a_hub_id_offline(hub, tiny_llama_dir, tiny_spec, prefect_harness, tmp_path):
    _hub_cache(hub, "org/tiny", tiny_llama_dir, SHA_A)
    spec = {**tiny_spec, "evaluation": {**tiny_spec["evaluation"], "tasks": []}}
    spec["model"] = {"ref": "smollm2-135m"}  # replaced by --model
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    res = runner.invoke(app, ["run", str(p), "--model", "org/tiny", "-q", "--set", "model.placement=disk"])
    assert res.exit_code == 0, res.output
    from tasks.steps import load_model_task

    man = load_model_task.fn(ctx={"store": spec["store"]["url"], "device": "cpu"}, ref="org/tiny")
    assert man["revision"] == SHA_A and man["hit"]
    # the ref moves to a new commit: the load step keys on the resolved sha, so it recomputes
    _hub_cache(hub, "org/tiny", tiny_llama_dir, SHA_B)
    man2 = load_model_task.fn(ctx={"store": spec["store"]["url"], "device": "cpu"}, ref="org/tiny")
    assert man2["revision"] == SHA_B and not man2["hit"] and man2["sha256"] != man["sha256"]


def test_s3_folder_is_fetched_once_and_fingerprinted(s3_env, tiny_llama_dir, pf_home):
    import os

    import s3fs
    import torch

    from pruning_core.checkpoint import load_pruned
    from pruning_core.models import resolve_source

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}, skip_instance_cache=True)
    url = s3_env.rsplit("/", 1)[0] + "/models/tiny"
    for f in tiny_llama_dir.iterdir():
        fs.put_file(str(f), f"{url}/{f.name}")
    path, fp = resolve_source(url)
    assert Path(path).is_relative_to(pf_home) and (Path(path) / "config.json").exists()
    assert resolve_source(url) == (path, fp)  # cached, same fingerprint
    m, _ = load_pruned(url, placement="disk")
    ref, _ = load_pruned(tiny_llama_dir)
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, ref(input_ids=ids).logits)
    fs.pipe_file(f"{url}/config.json", (tiny_llama_dir / "config.json").read_bytes() + b" ")
    assert resolve_source(url)[1] != fp  # a changed object is a new revision
