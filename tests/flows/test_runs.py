"""One run folder per spec: runs that differ in any setting never overwrite each other's report, plots
or checkpoint link; `report` and `compare` take a run id, a unique id prefix or a run name (its latest
run). Also the run's `seed`, a first run's cache explanations, and `--params` against `--ratio`."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.compress import compress
from flows.spec import build_spec, validate
from pruning_core.errors import ConfigError

runner = CliRunner()


def test_runs_differing_in_calibration_get_their_own_folders(prefect_harness, tiny_spec, pf_home):
    spec = {k: v for k, v in tiny_spec.items() if k != "name"}
    a = compress(spec=spec)
    b = compress(spec={**spec, "calibration": {**spec["calibration"], "n_samples": 6}})
    assert a["name"] == b["name"]
    assert a["id"] != b["id"] and a["id"].startswith(a["name"] + "-")
    ra, rb = (pf_home / "runs" / r["id"] for r in (a, b))
    assert json.loads((ra / "report.json").read_text())["spec"]["calibration"]["n_samples"] == 4
    assert json.loads((rb / "report.json").read_text())["spec"]["calibration"]["n_samples"] == 6
    assert os.readlink(ra / "checkpoint") == a["artifacts"]["checkpoint"]
    assert os.readlink(rb / "checkpoint") == b["artifacts"]["checkpoint"]
    assert a["artifacts"]["checkpoint"] != b["artifacts"]["checkpoint"]
    # the same spec again: the same folder (a rerun, not a new run)
    assert compress(spec=spec)["id"] == a["id"]
    os.utime(ra / "report.json", (2e9, 2e9))  # a is now the latest run of the name
    res = runner.invoke(app, ["report", a["name"], "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["id"] == a["id"]
    res = runner.invoke(app, ["report", b["id"], "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["id"] == b["id"]
    res = runner.invoke(app, ["compare", a["id"], b["id"]])
    assert res.exit_code == 0 and res.stdout.count("wanda") >= 2
    assert a["id"] in res.stdout and b["id"] in res.stdout  # the two runs are told apart
    # a prefix both ids share is ambiguous: one line listing them
    res = runner.invoke(app, ["report", a["name"][:4]])
    assert res.exit_code == 2 and a["id"] in res.output and b["id"] in res.output
    assert res.output.strip().count("\n") == 0
    # --name names the folder
    named = compress(spec={**spec, "name": "mine"})
    assert named["id"] == "mine" and (pf_home / "runs" / "mine" / "report.json").is_file()


def test_a_first_run_says_first_run_for_every_step(prefect_harness, tiny_spec, pf_home):
    first = compress(spec=tiny_spec)
    assert first["cache_why"], first
    assert all(v.startswith("first run") for v in first["cache_why"].values()), first["cache_why"]


def test_the_run_seed_seeds_what_is_not_seeded_explicitly():
    s = build_spec(None, ["seed=7", "method.name=random", "recovery.kind=lora"])
    assert s.calibration.seed == 7 and s.method.settings["seed"] == 7 and s.recovery.settings["seed"] == 7
    s = build_spec(None, ["seed=7", "calibration.seed=3", "method.name=random", "method.settings.seed=5"])
    assert s.calibration.seed == 3 and s.method.settings["seed"] == 5
    assert build_spec(None, []).calibration.seed == 0  # the default run is unchanged
    # a re-validated dump keeps its seeds (a flow re-validates the spec it is given)
    s = build_spec(None, ["seed=7"])
    assert validate(s.model_dump(mode="json")).calibration.seed == 7
    assert build_spec(None, ["seed=7"]).run_id() != build_spec(None, ["seed=8"]).run_id()


@pytest.mark.parametrize("name", ["../../escape", "a/b", "..", ".hidden", "", "x" * 200])
def test_a_name_is_one_folder_inside_the_runs(name):
    with pytest.raises(ConfigError, match="^name: "):
        build_spec(None, [], name=name) if name else validate({"name": name})


def test_params_and_ratio_together_are_refused():
    with pytest.raises(ConfigError, match="^params: .*not both"):
        build_spec(None, [], params="100M", ratio=0.3)
