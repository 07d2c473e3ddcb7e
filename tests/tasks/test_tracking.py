"""MLflow tracking of a compression run on a real MLflow (SQLite store in a temp folder).

A tiny random Llama checkpoint (uniform and non-uniform) with a WordLevel tokenizer, and a synthetic
report in the compress flow's shape, its report.md + plots written as the flow's report step does
(`pruning_core.report.write_report`), so these tests do not depend on the pipeline; tracking logs
only those files and figures.
The `server` test runs a real `mlflow server` on 127.0.0.1 whose artifact store is S3 on moto.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import _validate_metric_name

from pruning_core.checkpoint import is_uniform, load_pruned, save_pruned
from pruning_core.errors import StorageError
from pruning_core.models import tiny_model
from pruning_core.plan import LayerPlan, PrunePlan
from pruning_core.surgery import apply_plan
from tasks.tracking import (
    TrackingSettings,
    gate_figures,
    registered_model_name,
    report_metrics,
    sanitize_metric_name,
    spec_params,
    track_compress_run,
)

PROMPT = "w1 w2 w3"


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "[EOS]"] + [f"w{i}" for i in range(125)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def _run_dir(root: Path, uniform: bool) -> Path:
    model = tiny_model("llama", n_layers=2)
    if uniform:
        plan = PrunePlan("l1", {"x": 1}, [LayerPlan(0, ffn=list(range(48))), LayerPlan(1, ffn=list(range(48)))])
    else:
        plan = PrunePlan("l1", {"x": 1}, [LayerPlan(0, ffn=list(range(48))), LayerPlan(1, heads=[0, 1], kv_heads=[0])])
    apply_plan(model, plan)
    run_dir = root / ("uniform" if uniform else "nonuniform")
    ckpt = save_pruned(model, _tokenizer(), plan, run_dir / "checkpoint")
    assert is_uniform(ckpt) == uniform
    (run_dir / "lm_eval_results.json").write_text(json.dumps({"results": {"t": {"acc,none": 0.45}}}))
    return run_dir


def _report(run_dir: Path, cache_score: str = "miss") -> dict:
    return {
        "model": "tiny-llama", "method": "l1", "settings": {"x": 1}, "target_ratio": 0.3,
        "params_before": 1000, "params_after": 700, "removed_fraction": 0.3,
        "metrics_before": {"ppl": {"ppl": 10.0, "protocol": "fixed_window_256"},
                           "lm_eval": {"t": {"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": "t"}}},
        "metrics_after": {"ppl": {"ppl": 12.0, "protocol": "fixed_window_256"},
                          "lm_eval": {"t": {"acc,none": 0.45, "acc_stderr,none": "N/A", "alias": "t"}}},
        "retention": {"ppl": 0.83, "lm_eval": {"t": {"acc,none": 0.9}}},
        "timings": {"capture": 1.5, "score": 0.5},
        "steps": {"capture": {"seconds": 1.5, "cache": "miss", "cache_key": "cap-1", "params": {"n_samples": 8}},
                  "score": {"seconds": 0.5, "cache": cache_score, "cache_key": "score-1"}},
        "artifacts": {"checkpoint": {"uri": f"file://{run_dir / 'checkpoint'}", "sha256": "x"},
                      "plan": str(run_dir / "checkpoint" / "plan.json"),
                      "lm_eval": str(run_dir / "lm_eval_results.json")},
        "versions": {"code_revision": "abc123"},
        "flow_run_id": "flow-run-1",
        "recovery": "lora",
        "recovery_info": {"kind": "lora", "loss_curve": [3.0, 2.5, 2.2]},
        **LAYERS,
    }


LAYERS = {"layers": [{"index": 0, "keep": True, "heads": None, "kv_heads": None, "ffn": 48, "ratio": 0.3},
                     {"index": 1, "keep": True, "heads": 2, "kv_heads": 1, "ffn": None, "ratio": 0.25}],
          "full_sizes": {"heads": 4, "kv_heads": 2, "ffn": 96}}


def _flow_writes(report: dict, run_dir: Path) -> dict:
    """What the flow's report step leaves in the run folder before tracking: report.json, report.md, plots/."""
    from pruning_core.report import write_report

    write_report(report, run_dir)
    return report


def _pipeline_report(run_dir: Path, score_uri: str, cache_score: str) -> dict:
    """The shape flows.compress builds: flat metrics, `cache` per step, artifacts = step output URIs."""
    link = run_dir / "checkpoint_link"
    if not link.exists():
        link.symlink_to(run_dir / "checkpoint", target_is_directory=True)
    return {
        "name": "r", "model": "tiny-llama", "method": "l1", "settings": {}, "target_ratio": 0.3,
        "params_before": 1000, "params_after": 650, "removed_fraction": 0.35,
        "metrics_before": {"ppl": 10.0, "ppl_protocol": "fixed_window_256", "t.acc,none": 0.5, "t.acc_norm,none": 0.6},
        "metrics_after": {"ppl": 15.0, "ppl_protocol": "fixed_window_256", "t.acc,none": 0.4, "t.acc_norm,none": 0.6},
        "retention": {"ppl": 1.5, "t.acc,none": 0.8},
        "timings": {"load": 0.1, "score": 0.5}, "cache": {"load": "miss", "score": cache_score},
        "artifacts": {"score": score_uri, "checkpoint": f"/store/objects/ab/{'ab' * 32}",  # content-addressed
                      "checkpoint_local": str(link),
                      "run_dir": str(run_dir)},
        "versions": {"code_revision": "abc123"},
        **LAYERS,
    }


SPEC = {"model": {"ref": "tiny"}, "method": {"name": "l1", "settings": {"x": 1}}, "ratio": 0.3,
        "calibration": {"n_samples": 8, "seq_len": 128}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("track")
    return root, f"sqlite:///{root / 'mlflow.db'}"


# ------------------------------------------------------------------------------------------ pure parts
def test_metric_names_are_sanitised_to_valid_mlflow_names():
    assert sanitize_metric_name("acc,none") == "acc"
    assert sanitize_metric_name("acc_norm,none") == "acc_norm"
    assert sanitize_metric_name("exact_match,strict-match") == "exact_match_strict-match"
    assert sanitize_metric_name("after.lm_eval.t.acc_stderr,none") == "after.lm_eval.t.acc_stderr"
    assert sanitize_metric_name("ppl (x)@1") == "ppl _x__1"
    for name in ("acc,none", "a:b;c", "ppl (x)@1", "x,y,z"):
        _validate_metric_name(sanitize_metric_name(name))  # raises on an invalid name


def test_report_figures_params_and_names(tmp_path):
    rep = _report(tmp_path)
    g = gate_figures(rep)
    assert g["ppl_ratio"] == pytest.approx(1.2) and g["acc_retention"] == pytest.approx(0.9)
    assert g["param_reduction"] == pytest.approx(0.3)
    m = report_metrics(rep)
    assert m["after.lm_eval.t.acc"] == 0.45 and m["before.ppl.ppl"] == 10.0 and m["time.capture"] == 1.5
    assert "after.lm_eval.t.acc_stderr" not in m  # "N/A" is not a number
    p = spec_params(SPEC)
    assert p["method.settings.x"] == "1" and p["calibration.seq_len"] == "128" and p["model.ref"] == "tiny"
    assert registered_model_name("/x/y/smollm2-135m/", "SlimGPT") == "smollm2-135m-slimgpt"
    assert TrackingSettings.from_spec({"tracking": "http://h:1"}).uri == "http://h:1"
    assert not TrackingSettings.from_spec({"tracking": {"enabled": False}}).enabled
    from tasks.tracking import curve_metrics

    cm = curve_metrics({**rep, "recovery_info": {"loss_curve": [3.0, "nan?", 2.0], "val_curve": [[0, 1.5], [2, 1.0]]}})
    assert cm["recovery.loss"] == [(1, 3.0), (3, 2.0)] and cm["recovery.val_mse"] == [(0, 1.5), (2, 1.0)]
    assert cm["layer.removed_fraction"] == [(0, 0.3), (1, 0.25)]
    assert curve_metrics({"model": "m"}) == {}  # nothing the flow did not write
    distilled = {**rep, "recovery_info": {"loss_curve": [2.0, 1.0], "kl_curve": [2.0, 1.0], "tokens_seen": 2048,
                                          "seconds": 4.0, "teacher_bytes": 6 * 2048 * 64, "kept_mass": 0.93}}
    assert curve_metrics(distilled)["recovery.kl"] == [(1, 2.0), (2, 1.0)]
    m = report_metrics(distilled)
    assert m["recovery.tokens_seen"] == 2048 and m["recovery.teacher_bytes"] == 6 * 2048 * 64
    assert m["recovery.kept_mass"] == 0.93


# ------------------------------------------------------------------------------------ tracking a run
def test_uniform_run_is_tracked_registered_and_generates(store, monkeypatch):
    root, uri = store
    run_dir = _run_dir(root, uniform=True)
    spec = {**SPEC, "tracking": {"uri": uri, "experiment": "t-uniform"}}
    res = track_compress_run(spec, _flow_writes(_report(run_dir), run_dir), run_dir)
    assert res["status"] == "ok", res
    assert json.loads((run_dir / "tracking.json").read_text())["run_id"] == res["run_id"]
    c = MlflowClient(uri, uri)
    parent = c.get_run(res["run_id"])
    assert parent.data.params["method.settings.x"] == "1"
    assert parent.data.metrics["after.lm_eval.t.acc"] == 0.45 and parent.data.metrics["gate.ppl_ratio"] == 1.2
    tags = parent.data.tags
    assert tags["pruneflow.prefect_flow_run_id"] == "flow-run-1" and tags["pruneflow.code_revision"] == "abc123"
    assert tags["pruneflow.cache.capture"] == "miss" and tags["pruneflow.cache.score"] == "miss"
    arts = {a.path for a in c.list_artifacts(res["run_id"])}
    assert {"plan.json", "report.json", "lm_eval_results.json", "plots"} <= arts
    plots = {a.path for a in c.list_artifacts(res["run_id"], "plots")}
    assert plots == {f"plots/{p.name}" for p in (run_dir / "plots").glob("*.png")}  # the flow's, no others
    assert {"plots/kept_per_layer.png", "plots/recovery_loss.png", "plots/layer_ratios.png"} <= plots
    assert "report.md" in arts
    hist = c.get_metric_history(res["run_id"], "recovery.loss")
    assert [(m.step, m.value) for m in hist] == [(1, 3.0), (2, 2.5), (3, 2.2)]
    assert [m.value for m in c.get_metric_history(res["run_id"], "layer.removed_fraction")] == [0.3, 0.25]
    # one nested child per step, with its settings and seconds
    children = c.search_runs([parent.info.experiment_id],
                             filter_string=f"tags.`mlflow.parentRunId` = '{res['run_id']}'")
    assert sorted(r.data.tags["pruneflow.step"] for r in children) == ["capture", "score"]
    cap = next(r for r in children if r.data.tags["pruneflow.step"] == "capture")
    assert cap.data.params["n_samples"] == "8" and cap.data.metrics["seconds"] == 1.5
    # registered under <model>-<method>, gate figures as version tags
    assert res["model_name"] == "tiny-llama-l1"
    mv = c.get_model_version("tiny-llama-l1", res["model_version"])
    assert mv.tags["pruneflow.ppl_ratio"] == "1.2" and mv.tags["pruneflow.run_id"] == res["run_id"]
    # loads back with pyfunc and with the transformers flavour, and generates text
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model_uri = f"models:/tiny-llama-l1/{res['model_version']}"
    out = mlflow.pyfunc.load_model(model_uri).predict([PROMPT])
    assert isinstance(out[0], str) and out[0].startswith(PROMPT) and len(out[0].split()) > 3
    comps = mlflow.transformers.load_model(model_uri, return_type="components")
    ids = comps["tokenizer"](PROMPT, return_tensors="pt").input_ids
    ref, _ = load_pruned(run_dir / "checkpoint")
    with torch.no_grad():
        assert torch.allclose(comps["model"](ids).logits, ref(ids).logits, atol=1e-5)


def test_nonuniform_run_uses_project_loader_and_cached_step_points_at_producer(store, monkeypatch):
    root, uri = store
    run_dir = _run_dir(root, uniform=False)
    spec = {**SPEC, "tracking": {"uri": uri, "experiment": "t-nonuniform"}}
    from safetensors.torch import save_file

    (run_dir / "lm_eval_results.json").unlink()  # the pipeline keeps lm-eval figures in the report only

    score_uri = str(root / "objects" / "ab" / "abcd" / "scores.safetensors")  # content-addressed store object
    Path(score_uri).parent.mkdir(parents=True)
    save_file({"heads.0": torch.rand(4), "ffn.0": torch.rand(96), "ffn.1": torch.rand(96)}, score_uri)
    first = track_compress_run(spec, _flow_writes(_pipeline_report(run_dir, score_uri, "miss"), run_dir), run_dir)
    second = track_compress_run(spec, _flow_writes(_pipeline_report(run_dir, score_uri, "hit"), run_dir), run_dir)
    assert first["status"] == second["status"] == "ok"
    c = MlflowClient(uri, uri)
    hit = c.get_run(second["child_runs"]["score"])
    assert hit.data.tags["pruneflow.cache"] == "hit"
    assert hit.data.tags["pruneflow.producer_run_id"] == first["child_runs"]["score"]
    assert c.get_run(second["run_id"]).data.tags["pruneflow.cache.score"] == "hit"
    assert "pruneflow.producer_run_id" not in c.get_run(first["child_runs"]["score"]).data.tags
    # the same checkpoint bytes (same content-addressed URI) are registered once; the rerun points at them
    assert second["model_version"] == first["model_version"] and second.get("model_reused")
    assert c.get_run(second["run_id"]).data.tags["pruneflow.model_producer_run_id"] == first["run_id"]
    run = c.get_run(second["run_id"])
    assert run.data.metrics["gate.acc_retention"] == pytest.approx(0.8)
    assert run.data.metrics["gate.ppl_ratio"] == pytest.approx(1.5) and run.data.metrics["after.t.acc_norm"] == 0.6
    arts = {a.path for a in c.list_artifacts(second["run_id"])} | {
        a.path for a in c.list_artifacts(second["run_id"], "plots")}
    assert {"plan.json", "lm_eval_results.json", "plots/kept_per_layer.png", "plots/layer_ratios.png"} <= arts
    assert "plots/recovery_loss.png" not in arts  # no recovery in this run: no curve invented
    lm = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=second["run_id"], artifact_path="lm_eval_results.json",
                                                             tracking_uri=uri)).read_text())
    assert lm["after"]["results"]["t"]["acc,none"] == 0.4
    # non-uniform: pyfunc rebuilt by load_pruned; greedy output equals the checkpoint's own generate
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    pm = mlflow.pyfunc.load_model(f"models:/tiny-llama-l1/{second['model_version']}")
    out = pm.predict([PROMPT, "w5"], params={"max_new_tokens": 6})
    model, tok = load_pruned(run_dir / "checkpoint")
    enc = tok(PROMPT, return_tensors="pt")
    ids = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out[0] == tok.decode(ids[0], skip_special_tokens=True)
    assert len(out) == 2 and 3 < len(out[0].split()) <= 3 + 6 and out[1].startswith("w5 ")
    short = pm.predict([PROMPT], params={"max_new_tokens": 1})[0]  # params reach generate
    assert out[0].startswith(short) and len(short.split()) < len(out[0].split())


def test_default_store_is_sqlite_in_pruneflow_home_and_sweep_is_tracked(tmp_path, monkeypatch):
    from tasks.tracking import track_sweep

    monkeypatch.setenv("PRUNEFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    res = track_compress_run({**SPEC, "tracking": {"log_model": False}}, _flow_writes(_report(run_dir), run_dir), run_dir)
    assert res["status"] == "ok" and res["uri"] == f"sqlite:///{(tmp_path / 'home' / 'mlflow.db').resolve()}"
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the fluent API's global URI is restored
    art = tmp_path / "home" / "mlartifacts" / res["run_id"] / "artifacts"
    assert json.loads((art / "report.json").read_text())["method"] == "l1"
    assert (art / "plots" / "recovery_loss.png").read_bytes()[:4] == b"\x89PNG"
    reports = []
    for method in ("l1", "wanda"):
        for ratio, ppl in ((0.1, 11.0), (0.3, 14.0)):
            r = _report(run_dir)
            r.update(method=method, target_ratio=ratio)
            r["metrics_after"]["ppl"]["ppl"] = ppl
            reports.append(r)
    sw = track_sweep({}, reports, run_dir)
    assert sw["status"] == "ok"
    art = tmp_path / "home" / "mlartifacts" / sw["run_id"] / "artifacts"
    pts = json.loads((art / "sweep.json").read_text())["points"]
    assert sorted((p["method"], p["ratio"], p["ppl"], p["acc"]) for p in pts)[0] == ("l1", 0.1, 11.0, 0.45)
    assert (art / "plots" / "sweep.png").stat().st_size > 1000
    # the sweep flow's own result shape (rows) reads the same
    from tasks.tracking import sweep_points

    rows = {"rows": [{"method": "l1", "ratio": 0.1, "ppl_after": 11.0, "params_after": 900,
                      "metrics_after": {"ppl": 11.0, "t.acc,none": 0.4, "t.acc_stderr,none": 0.1}}]}
    assert sweep_points(rows) == [{"method": "l1", "ratio": 0.1, "ppl": 11.0, "acc": 0.4, "params_after": 900.0}]


def test_unreachable_server_warns_or_fails_and_keeps_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    port = _free_port()  # nothing listens there
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint").mkdir(parents=True)
    (run_dir / "checkpoint" / "config.json").write_text("{}")
    (run_dir / "report.json").write_text("{}")
    spec = {"tracking": {"uri": f"http://127.0.0.1:{port}", "on_failure": "warn", "probe_timeout_s": 1}}
    t0 = time.monotonic()
    res = track_compress_run(spec, _report(run_dir), run_dir)
    assert time.monotonic() - t0 < 10
    assert res["status"].startswith("failed:") and res["run_id"] is None
    assert json.loads((run_dir / "tracking.json").read_text())["status"].startswith("failed:")
    assert (run_dir / "checkpoint" / "config.json").exists() and (run_dir / "report.json").exists()
    spec["tracking"]["on_failure"] = "fail"
    with pytest.raises(StorageError, match="tracking.uri"):
        track_compress_run(spec, _report(run_dir), run_dir)


# ------------------------------------------------------------------------- real server + S3 on moto
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(f"{url} not answering after {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.mark.server
def test_real_mlflow_server_with_s3_artifacts_on_moto(tmp_path, monkeypatch):
    bindir = Path(sys.executable).parent
    if not (bindir / "moto_server").exists() or not (bindir / "mlflow").exists():
        pytest.skip("moto_server / mlflow executables not installed")
    moto_port, mlflow_port = _free_port(), _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{moto_port}", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes
    env.pop("MLFLOW_TRACKING_URI", None)
    logs = tmp_path / "logs"
    logs.mkdir()
    moto = subprocess.Popen([str(bindir / "moto_server"), "-H", "127.0.0.1", "-p", str(moto_port)],
                            stdout=open(logs / "moto.log", "wb"), stderr=subprocess.STDOUT, env=env)
    server = None
    try:
        _wait_http(f"http://127.0.0.1:{moto_port}/", moto, 30)
        import boto3

        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}", aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        s3.create_bucket(Bucket="mlflow")
        server = subprocess.Popen(
            [str(bindir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
             "--artifacts-destination", "s3://mlflow/artifacts", "--workers", "1"],
            stdout=open(logs / "mlflow.log", "wb"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", server, 90)
        uri = f"http://127.0.0.1:{mlflow_port}"
        run_dir = _run_dir(tmp_path, uniform=False)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the plain env var is enough: no spec value
        res = track_compress_run({**SPEC, "tracking": {"experiment": "srv"}}, _report(run_dir), run_dir)
        assert res["status"] == "ok", res
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow").get("Contents", [])]
        assert any(k.endswith("report.json") for k in keys)
        assert any(k.endswith(".safetensors") for k in keys)  # the checkpoint went to S3
        out = mlflow.pyfunc.load_model(f"models:/{res['model_name']}/{res['model_version']}").predict([PROMPT])
        assert out[0].startswith(PROMPT)
    finally:
        if server is not None:
            _stop(server)
        _stop(moto)
        shutil.rmtree(tmp_path / "mlruns", ignore_errors=True)
