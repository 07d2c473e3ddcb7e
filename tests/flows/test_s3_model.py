"""`pruneflow run --model s3://bucket/prefix` against moto: preflight accepts it (reading config.json only),
the run completes, a rerun reuses every step, and a changed object makes `load` (and what follows) miss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]


def _upload(fs, folder: Path, prefix: str) -> None:
    for f in sorted(folder.iterdir()):
        if f.is_file():
            fs.put_file(str(f), f"{prefix}/{f.name}")


def _run(spec_path: Path, model: str, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PRUNEFLOW_FAULT"))}
    env.update(PRUNEFLOW_HOME=str(home), PREFECT_HOME=str(home / "prefect"),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="240")
    p = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(spec_path), "--model", model, "--quiet", "--json"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return json.loads(p.stdout[p.stdout.index("{"):])


@pytest.mark.server
def test_run_with_an_s3_model_and_a_changed_object_misses_load(s3_env, tiny_spec, tiny_llama_dir, pf_home, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}, skip_instance_cache=True)
    bucket = s3_env.split("://", 1)[1].split("/", 1)[0]
    prefix = f"{bucket}/models/tiny"
    _upload(fs, tiny_llama_dir, prefix)
    model = f"s3://{prefix}"
    spec = {**tiny_spec, "name": "s3-model"}
    spec.pop("model")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    first = _run(path, model, pf_home)
    assert first["cache"]["load"] == "miss" and first["metrics_after"]["ppl"] > 0
    second = _run(path, model, pf_home)
    assert set(second["cache"].values()) <= {"hit", "skipped"}, second["cache"]
    # the same name, a new object behind it (an extra harmless key in config.json): load misses
    cfg = json.loads(fs.cat_file(f"{prefix}/config.json"))
    fs.pipe_file(f"{prefix}/config.json", json.dumps({**cfg, "pruneflow_note": "re-uploaded"}).encode())
    third = _run(path, model, pf_home)
    assert third["cache"]["load"] == "miss", third["cache"]
    assert third["cache"]["calibration"] == "miss"  # every later key follows the new revision
    assert third["metrics_after"]["ppl"] == pytest.approx(first["metrics_after"]["ppl"])


def test_preflight_reads_only_config_and_refuses_in_one_line(s3_env, tiny_llama_dir, pf_home, monkeypatch):
    import s3fs

    from flows.cli import app
    from flows.preflight import model_config

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}, skip_instance_cache=True)
    bucket = s3_env.split("://", 1)[1].split("/", 1)[0]
    _upload(fs, tiny_llama_dir, f"{bucket}/m")
    cfg, folder = model_config(f"s3://{bucket}/m")
    assert cfg["model_type"] == "llama" and folder is None
    assert not (pf_home / "models").exists()  # nothing downloaded
    res = CliRunner().invoke(app, ["run", "--model", f"s3://{bucket}/absent", "-q"])
    err = res.stderr.strip()
    assert res.exit_code == 2 and err.startswith("error: model.ref") and "\n" not in err, res.output
    monkeypatch.setenv("PRUNEFLOW_S3_TIMEOUT", "soon")
    res = CliRunner().invoke(app, ["run", "--model", f"s3://{bucket}/m", "-q"])
    err = res.stderr.strip()
    assert res.exit_code == 2 and "PRUNEFLOW_S3_TIMEOUT" in err and "\n" not in err, res.output
