"""Gated promotion and rollback on a real MLflow registry (SQLite in a temp folder).

Versions are registered with the tags `tasks.tracking` derives from a run report (the same
`version_tags`), pointing at a dummy source: promotion only reads the registry.
"""

from __future__ import annotations

import json
import threading

import pytest
from mlflow.tracking import MlflowClient

from flows.promote import CHALLENGER, CHAMPION, Gate, promote_version, rollback
from pruning_core.errors import ConfigError
from tasks.tracking import version_tags

SOURCE: list[str] = []
GATE = {"max_ppl_ratio": 1.5, "min_acc_retention": 0.9, "min_param_reduction": 0.1}


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    # one store for the module (creating an MLflow SQLite schema costs seconds); every test uses its own names
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module", autouse=True)
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    (d / "MLmodel").write_text("flavors: {}\n")
    SOURCE[:] = [str(d)]


@pytest.fixture()
def m(request):
    return request.node.name.replace("_", "-")  # a registered-model name of its own per test


def _report(ppl_after: float, acc_after: float | None, removed: float) -> dict:
    before = {"ppl": {"ppl": 10.0, "protocol": "fixed_window_256"}, "lm_eval": {"t": {"acc,none": 0.5}}}
    after = {"ppl": {"ppl": ppl_after, "protocol": "fixed_window_256"}}
    if acc_after is not None:
        after["lm_eval"] = {"t": {"acc,none": acc_after}}
    return {"model": "tiny", "method": "l1", "target_ratio": removed, "params_before": 1000,
            "params_after": round(1000 * (1 - removed)), "metrics_before": before, "metrics_after": after}


def _version(client: MlflowClient, name: str, report: dict) -> str:
    try:
        client.create_registered_model(name)
    except Exception:
        pass  # already registered
    mv = client.create_model_version(name, source=SOURCE[0], tags=version_tags(report))
    return str(mv.version)


def _alias(client, name, alias):
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except Exception:
        return None


def test_gate_pass_moves_champion_fail_never_does(uri, m):
    c = MlflowClient(uri, uri)
    v1 = _version(c, m, _report(12.0, 0.48, 0.2))  # ppl ratio 1.2, retention 0.96
    r1 = promote_version(m, v1, GATE, uri)
    assert r1["passed"] and r1["promoted"] and _alias(c, m, CHAMPION) == v1
    assert _alias(c, m, CHALLENGER) == v1

    v2 = _version(c, m, _report(30.0, 0.49, 0.3))  # ppl ratio 3.0 > 1.5: fails
    r2 = promote_version(m, None, GATE, uri)  # None: latest version
    assert r2["version"] == v2 and not r2["passed"] and not r2["promoted"]
    assert _alias(c, m, CHAMPION) == v1  # a failed gate never moves champion
    assert _alias(c, m, CHALLENGER) == v2  # every candidate becomes challenger
    tags = c.get_model_version(m, v2).tags
    assert tags["pruneflow.gate.passed"] == "false"
    checks = json.loads(tags["pruneflow.gate.checks"])
    assert checks["ppl_ratio"] == {"value": 3.0, "limit": 1.5, "rule": "<=", "ok": False}
    assert checks["acc_retention"]["ok"] and checks["param_reduction"]["ok"]
    assert "ppl_ratio" in r2["reason"]
    assert c.get_model_version(m, v1).tags["pruneflow.gate.passed"] == "true"


def test_passing_candidate_must_beat_champion(uri, m):
    c = MlflowClient(uri, uri)
    v1 = _version(c, m, _report(12.0, 0.5, 0.2))
    promote_version(m, v1, GATE, uri)
    v2 = _version(c, m, _report(13.0, 0.5, 0.2))  # passes, but worse perplexity
    r2 = promote_version(m, v2, GATE, uri)
    assert r2["passed"] and not r2["promoted"] and _alias(c, m, CHAMPION) == v1
    v3 = _version(c, m, _report(11.0, 0.5, 0.2))  # passes and beats v1
    r3 = promote_version(m, v3, GATE, uri)
    assert r3["promoted"] and _alias(c, m, CHAMPION) == v3
    assert c.get_model_version(m, v3).tags["pruneflow.previous_champion"] == v1


def test_missing_evidence_fails_and_checks_can_be_switched_off(uri, m):
    c = MlflowClient(uri, uri)
    v1 = _version(c, m, _report(12.0, None, 0.2))  # no accuracy measured
    r = promote_version(m, v1, GATE, uri)
    assert not r["passed"] and r["checks"]["acc_retention"]["value"] is None
    assert _alias(c, m, CHAMPION) is None
    r = promote_version(m, v1, {**GATE, "min_acc_retention": None}, uri)
    assert r["passed"] and "acc_retention" not in r["checks"] and _alias(c, m, CHAMPION) == v1


def test_rollback_moves_alias_back_and_retires(uri, m):
    c = MlflowClient(uri, uri)
    v1 = _version(c, m, _report(12.0, 0.5, 0.2))
    v2 = _version(c, m, _report(11.0, 0.5, 0.2))
    promote_version(m, v1, GATE, uri)
    promote_version(m, v2, GATE, uri)
    assert _alias(c, m, CHAMPION) == v2
    r = rollback(m, tracking_uri=uri, gate=GATE)
    assert r["champion"] == v1 and r["champion_before"] == v2 and r["retired"] == [v2]
    assert _alias(c, m, CHAMPION) == v1
    assert c.get_model_version(m, v2).tags["pruneflow.retired"].startswith(f"rolled back from v{v2}")
    # a later passing candidate better than v1 (but worse than the retired v2) takes over; v2 stays out
    v3 = _version(c, m, _report(11.5, 0.5, 0.2))
    assert promote_version(m, v3, GATE, uri)["promoted"] and _alias(c, m, CHAMPION) == v3
    # rolling back to an explicit (retired) version un-retires it
    r = rollback(m, to_version=v2, tracking_uri=uri, gate=GATE)
    assert _alias(c, m, CHAMPION) == v2 and "pruneflow.retired" not in c.get_model_version(m, v2).tags
    assert r["retired"] == [v3]


def test_rollback_without_history_is_a_user_error(uri, m):
    c = MlflowClient(uri, uri)
    v1 = _version(c, m, _report(12.0, 0.5, 0.2))
    with pytest.raises(ConfigError, match="model"):
        rollback(m, tracking_uri=uri)  # no champion yet
    promote_version(m, v1, GATE, uri)
    with pytest.raises(ConfigError, match="previous champion"):
        rollback(m, tracking_uri=uri)
    with pytest.raises(ConfigError, match="version"):
        rollback(m, to_version=7, tracking_uri=uri)


def test_two_promotions_racing_end_on_the_better_model(uri, m):
    c = MlflowClient(uri, uri)
    for rep in range(3):
        name = f"race{rep}"
        good = _version(c, name, _report(11.0, 0.5, 0.2))
        bad = _version(c, name, _report(12.0, 0.5, 0.2))
        barrier, errors = threading.Barrier(2), []
        order = (bad, good) if rep % 2 else (good, bad)

        def go(v, name=name, barrier=barrier, errors=errors):
            try:
                barrier.wait(timeout=10)
                promote_version(name, v, GATE, uri, settle_s=0.01)
            except Exception as e:  # surfaced below
                errors.append(e)

        threads = [threading.Thread(target=go, args=(v,)) for v in order]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors
        assert _alias(c, name, CHAMPION) == good


def test_gate_settings_are_validated():
    with pytest.raises(ConfigError, match="gate.max_ppl"):
        Gate.from_dict({"max_ppl": 2})
    with pytest.raises(ConfigError, match="gate.rank_by"):
        Gate.from_dict({"rank_by": "accuracy"})
    with pytest.raises(ConfigError, match="gate.min_param_reduction"):
        Gate.from_dict({"min_param_reduction": "lots"})
    g = Gate.from_dict({"rank_by": "acc_retention", "higher_is_better": True})
    assert g.key({"acc_retention": 0.9}, 1) < g.key({"acc_retention": 0.8}, 2)


def test_unknown_model_or_version_is_a_user_error(uri, m):
    c = MlflowClient(uri, uri)
    _version(c, m, _report(12.0, 0.5, 0.2))
    with pytest.raises(ConfigError, match="model"):
        promote_version("nope", None, GATE, uri)
    with pytest.raises(ConfigError, match="version"):
        promote_version(m, 9, GATE, uri)


def test_cli_promote_both_outcomes_and_rollback(uri, m, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    c = MlflowClient(uri, uri)
    monkeypatch.setenv("PRUNEFLOW_HOME", str(tmp_path))
    v1 = _version(c, m, _report(12.0, 0.5, 0.2))
    v2 = _version(c, m, _report(11.0, 0.5, 0.2))
    # a run folder as the candidate: its tracking.json names the model version and the store
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "tracking.json").write_text(json.dumps({"status": "ok", "model_name": m, "model_version": v1, "uri": uri}))
    runner = CliRunner()
    ok = runner.invoke(app, ["promote", "r1", "--max-ppl-ratio", "1.5", "--min-acc-retention", "0.9"])
    assert ok.exit_code == 0, ok.output
    assert "gate passed" in ok.output and _alias(c, m, CHAMPION) == v1
    bad = runner.invoke(app, ["promote", m, "--version", v2, "--max-ppl-ratio", "1.05", "--tracking-uri", uri])
    assert bad.exit_code == 1 and "gate FAILED" in bad.output and "ppl_ratio 1.1 not <= 1.05" in bad.output
    assert _alias(c, m, CHAMPION) == v1 and _alias(c, m, CHALLENGER) == v2
    good = runner.invoke(app, ["promote", m, "--version", v2, "--min-acc-retention", "off", "--tracking-uri", uri])
    assert good.exit_code == 0 and _alias(c, m, CHAMPION) == v2
    back = runner.invoke(app, ["rollback", m, "--tracking-uri", uri])
    assert back.exit_code == 0 and f"v{v2} -> v{v1}" in back.output and _alias(c, m, CHAMPION) == v1
    err = runner.invoke(app, ["promote", m, "--max-ppl-ratio", "lots", "--tracking-uri", uri])
    assert err.exit_code == 2 and "--max-ppl-ratio" in err.output


def test_promote_flow_body_takes_a_run_folder(uri, m, tmp_path):
    from flows.promote import promote_flow

    c = MlflowClient(uri, uri)
    v1 = _version(c, m, _report(12.0, 0.5, 0.2))
    (tmp_path / "tracking.json").write_text(json.dumps({"status": "ok", "model_name": m, "model_version": v1,
                                                        "uri": uri}))
    res = promote_flow.fn(model=str(tmp_path), gate=GATE)  # the flow's body, without a Prefect server
    assert res["model"] == m and res["version"] == v1 and res["promoted"]
    (tmp_path / "tracking.json").write_text(json.dumps({"status": "failed: ConnectionError"}))
    with pytest.raises(ConfigError, match="registered"):
        promote_flow.fn(model=str(tmp_path), gate=GATE)
