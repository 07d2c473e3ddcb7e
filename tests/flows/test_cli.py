"""The `pruneflow` command: validation errors are one line + exit 2; plan / methods / report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _yaml(tmp_path: Path, data) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def _one_line_error(res, *needles: str) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output)
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in res.output
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize(
    "spec, needles",
    [
        ({"calibration": {"n_sample": 8}}, ["calibration.n_sample", "n_samples"]),
        ({"modle": {"ref": "x"}}, ["modle", "model"]),
        ({"calibration": {"n_samples": "many"}}, ["calibration.n_samples", "many"]),
        ({"ratio": 1.5}, ["ratio", "1.5"]),
        ({"method": {"name": "nope"}}, ["method.name", "wanda"]),
        ({"method": {"name": "wanda", "settings": {"gqa": "sideways"}}}, ["method.settings.gqa"]),
        ({"tracking": {"on_failure": "explode"}}, ["tracking.on_failure"]),
        ({"device": "tpu"}, ["device", "tpu"]),
    ],
)
def test_bad_spec_is_one_line_exit_2(tmp_path, pf_home, spec, needles):
    res = runner.invoke(app, ["run", str(_yaml(tmp_path, spec)), "--quiet"])
    _one_line_error(res, *needles)
    assert not (pf_home / "runs").exists()  # nothing half-written


def test_bad_yaml_and_bad_override(tmp_path, pf_home):
    _one_line_error(runner.invoke(app, ["run", str(_yaml(tmp_path, "model: [unclosed\n")), "-q"]), "valid YAML")
    _one_line_error(runner.invoke(app, ["run", "--set", "ratio", "-q"]), "--set")
    _one_line_error(runner.invoke(app, ["run", "--set", "calibration.seq_len=abc", "-q"]), "calibration.seq_len")
    _one_line_error(runner.invoke(app, ["run", str(tmp_path / "absent.yaml"), "-q"]), "spec")


def test_unreachable_store_and_missing_credentials(tmp_path, pf_home, monkeypatch):
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    _one_line_error(runner.invoke(app, ["run", "--store", "s3://bucket/p", "-q"]), "store.url", "reachable")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    _one_line_error(runner.invoke(app, ["run", "--store", "s3://bucket/p", "-q"]), "store.url", "credentials")
    _one_line_error(runner.invoke(app, ["run", "--store", "ftp://host/x", "-q"]), "store.url")


def test_plan_is_a_dry_run_with_per_layer_sizes(tiny_llama_dir, pf_home):
    res = runner.invoke(app, ["plan", "--model", str(tiny_llama_dir), "--ratio", "0.5", "--json", "--method", "l2",
                              "--set", "method.settings.gqa=per_group"])  # compared with l2's surgery below
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert len(out["layers"]) == 2
    for row in out["layers"]:
        assert (row["heads"], row["heads_after"], row["kv_heads_after"]) == (4, 2, 2)
        assert (row["ffn"], row["ffn_after"]) == (96, 48)
        assert row["params_after"] < row["params"] and row["flops_after"] < row["flops"]
    t = out["total"]
    assert t["params_after"] == out["plan_params"][1] and t["params"] == out["plan_params"][0]
    # the dry run matches what surgery really does
    from pruning_core.adapters import adapter_for
    from pruning_core.checkpoint import load_pruned
    from pruning_core.methods import get_method
    from pruning_core.surgery import apply_plan, count_params

    model, _ = load_pruned(tiny_llama_dir)
    meth = get_method("l2")
    st = meth.parse_settings({"gqa": "per_group"})
    plan = meth.select(model, adapter_for(model), meth.score(model, adapter_for(model), {}, st), 0.5, st)
    assert count_params(apply_plan(model, plan)) == t["params_after"]
    # human-readable table too
    res = runner.invoke(app, ["plan", "--model", str(tiny_llama_dir), "--ratio", "0.5"])
    assert res.exit_code == 0 and "FLOPs/token" in res.stdout


def test_methods_and_report_lookup(pf_home):
    res = runner.invoke(app, ["methods", "--json"])
    assert res.exit_code == 0
    names = {m["name"] for m in json.loads(res.stdout)}
    assert {"wanda", "l2", "random"} <= names
    _one_line_error(runner.invoke(app, ["report", "no-such-run"]), "run", "no-such-run")
    rd = pf_home / "runs" / "r1"
    rd.mkdir(parents=True)
    rep = {"name": "r1", "model": "m", "method": "l2", "target_ratio": 0.2, "params_before": 100, "params_after": 80,
           "metrics_before": {"ppl": 10.0}, "metrics_after": {"ppl": 12.0}, "retention": {"ppl": 1.2},
           "cache": {"load": "hit"}, "timings": {"load": 0.1}, "artifacts": {"checkpoint": "/x", "run_dir": str(rd)}}
    (rd / "report.json").write_text(json.dumps(rep))
    res = runner.invoke(app, ["report", "r1"])
    assert res.exit_code == 0 and "12" in res.stdout and "ppl" in res.stdout
    res = runner.invoke(app, ["compare", "r1", str(rd / "report.json")])
    assert res.exit_code == 0 and "l2" in res.stdout


def test_real_process_exit_code_and_no_traceback(tmp_path):
    bad = _yaml(tmp_path, {"calibration": {"seq_len": "long"}})
    env = {**os.environ, "PRUNEFLOW_HOME": str(tmp_path / "home")}
    p = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(bad)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error: calibration.seq_len")
    assert "Traceback" not in p.stderr
