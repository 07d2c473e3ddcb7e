"""`export: vllm` in the spec, the export step of the compress flow, `pruneflow export` and `plan`'s servability."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.compress import compress
from flows.spec import build_spec, validate
from pruning_core.errors import ConfigError
from tests.flows.test_cli import _one_line_error
from tests.serve_kinds import build

runner = CliRunner()


def test_servable_constraint_is_opt_in():
    # pruneflow's vLLM plugin serves any result: `export: vllm` no longer narrows the plan
    s = validate({"method": {"name": "slimgpt"}, "export": "vllm"})
    assert s.export.format == "vllm" and s.method.settings["servable"] == "none"
    s = validate({"method": {"name": "slimgpt"}, "export": {"format": "vllm"}, "servable": "vllm"})
    assert s.method.settings["servable"] == "vllm"  # for stock vLLM, without the plugin
    assert validate({"method": {"name": "wanda"}}).method.settings["servable"] == "none"
    assert validate({"method": {"name": "l2"}, "servable": "vllm"}).method.settings["servable"] == "vllm"
    assert build_spec().export.format == "vllm"  # `make run` ends with a servable folder
    with pytest.raises(ConfigError, match="export.format"):
        validate({"export": "tgi"})
    with pytest.raises(ConfigError, match="servable"):
        validate({"servable": "triton"})


def test_pipeline_run_ends_with_a_servable_folder(prefect_harness, tiny_spec, pf_home, tmp_path):
    spec = {**tiny_spec, "name": "tiny-serve", "method": {"name": "slimgpt"}, "export": "vllm",
            "calibration": {"n_samples": 4, "seq_len": 32, "seed": 0}}
    first = compress(spec=spec)
    second = compress(spec=spec)
    assert first["cache"]["export"] == "miss" and second["cache"]["export"] == "hit"
    assert first["settings"]["servable"] == "none"
    served = Path(first["artifacts"]["servable_local"])
    assert served == Path(first["artifacts"]["run_dir"]) / "servable-vllm"
    cfg = json.loads((served / "config.json").read_text())
    ckpt = json.loads((Path(first["artifacts"]["checkpoint_local"]) / "config.json").read_text())
    heads = {d["n_heads"] for d in ckpt.get("pruneflow_layers", []) if d["kind"] == "decoder"}
    if first["servable"]["layout"] == "stock":
        assert "pruneflow_layers" not in ckpt and cfg == ckpt
    elif first["servable"]["layout"] == "decilm":
        assert cfg["architectures"] == ["DeciLMForCausalLM"] and heads == {cfg["num_attention_heads"]}
    else:  # query heads per layer (SlimGPT's default per_group): pruneflow's vLLM plugin
        assert cfg["architectures"] == ["PruneflowLlamaForCausalLM"] and len(heads) > 1
        assert cfg["pruneflow_layers"] == ckpt["pruneflow_layers"]
    # the CLI exports the same run by name, to a folder of the user's choice
    res = runner.invoke(app, ["export", "tiny-serve", str(tmp_path / "out"), "--format", "vllm", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["layout"] == first["servable"]["layout"]
    assert (tmp_path / "out" / "config.json").read_bytes() == (served / "config.json").read_bytes()


def test_cli_export_errors_are_one_line(tmp_path, pf_home):
    src = build("unservable", tmp_path / "ckpt")  # query heads differ: stock vLLM cannot, the plugin can
    res = runner.invoke(app, ["export", str(src), str(tmp_path / "out")])
    assert res.exit_code == 0 and "plugin" in res.stdout and "layer 1 keeps 6" in res.stdout
    serve = next(ln for ln in res.stdout.splitlines() if ln.startswith("serve it:"))
    assert f" {tmp_path / 'out'} " in serve and serve.endswith("--host 127.0.0.1")  # no remote code
    _one_line_error(runner.invoke(app, ["export", str(src), str(tmp_path / "o"), "--format", "onnx"]), "export.format")
    _one_line_error(runner.invoke(app, ["export", "no-such-run", str(tmp_path / "o")]), "run", "no-such-run")
    res = runner.invoke(app, ["export", str(build("ffn_widths", tmp_path / "ok")), str(tmp_path / "o2")])
    assert res.exit_code == 0 and "--trust-remote-code" in res.stdout


def test_plan_reports_servability_and_what_the_constraint_changes(tiny_llama_dir, pf_home):
    base = ["plan", "--model", str(tiny_llama_dir), "--method", "slimgpt", "--ratio", "0.5", "--json",
            "--set", "method.settings.gqa=per_group"]
    free = json.loads(runner.invoke(app, base).stdout)
    fixed = json.loads(runner.invoke(app, base + ["--set", "servable=vllm"]).stdout)
    assert free["basis"].startswith("the method's own schedule")
    heads = [r["heads_after"] for r in fixed["layers"]]
    assert fixed["servable"]["vllm"] and len(set(heads)) == 1 and fixed["servable"]["query_heads"] == heads[0]
    ch = fixed["servable"]["changes"]
    assert ch["unconstrained_params_after"] == free["plan_params"][1]
    changed = {c["layer"] for c in ch["changed"]}
    for r_free, r in zip(free["layers"], fixed["layers"]):
        same = (r_free["heads_after"], r_free["ffn_after"]) == (r["heads_after"], r["ffn_after"])
        assert same == (r["layer"] not in changed)
    assert fixed["servable"]["format"] in ("stock", "decilm")
    if len({r["heads_after"] for r in free["layers"]}) > 1:
        assert not free["servable"]["vllm"] and "servable: vllm" in free["servable"]["reason"]
        assert free["servable"]["format"] == "plugin"
        assert "vLLM format: plugin" in runner.invoke(app, base[:-3]).stdout
    text = runner.invoke(app, base[:-3] + ["--set", "servable=vllm"]).stdout
    assert "servable by stock vLLM: yes" in text
