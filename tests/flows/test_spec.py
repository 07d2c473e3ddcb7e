"""The run spec: defaults, YAML + overrides, the method's own settings validation, recovery checks."""

from __future__ import annotations

import pytest

from flows.spec import DEFAULT_SPEC, build_spec, validate
from pruning_core.errors import ConfigError


def test_default_spec_is_the_embedded_default():
    s = build_spec()
    assert s.model.ref == "smollm2-135m" and s.calibration.source == "pydoc"
    assert s.ratio == DEFAULT_SPEC["ratio"] == 0.2
    assert s.method.name == "slimgpt" and s.method.settings["gqa"] == "per_group"
    # method settings are filled in by the method's own settings model
    assert s.method.settings["schedule"] == "log_increase" and s.method.settings["percdamp"] == 0.01


def test_overrides_from_the_command_line(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("method: {name: l2}\nratio: 0.1\ncalibration: {n_samples: 8}\n")
    s = build_spec(p, ["ratio=0.3", "method.settings.gqa=per_group", "evaluation.tasks=[a, b]"], device="cpu")
    assert s.ratio == 0.3 and s.method.settings["gqa"] == "per_group" and s.calibration.n_samples == 8
    assert s.evaluation.tasks == ["a", "b"] and s.device == "cpu"
    assert s.store.url is None
    assert validate({"store": "s3://b/p"}).store.url == "s3://b/p"


def test_schedule_goes_to_the_method_and_is_checked():
    s = validate({"method": {"name": "wanda"}, "schedule": "uniform"})
    assert s.method.settings["schedule"] == "uniform"
    with pytest.raises(ConfigError, match="schedule"):
        validate({"method": {"name": "wanda"}, "schedule": "zigzag"}).method  # noqa: B018
    with pytest.raises(ConfigError, match="method.settings.seed"):
        validate({"method": {"name": "wanda", "settings": {"seed": "x"}}})


def test_recovery_settings_are_validated():
    s = validate({"recovery": {"kind": "lora", "settings": {"steps": 3}}})
    assert s.recovery.settings["steps"] == 3 and s.recovery.settings["rank"] == 8
    with pytest.raises(ConfigError, match="recovery.settings.rnk"):
        validate({"recovery": {"kind": "lora", "settings": {"rnk": 4}}})
    with pytest.raises(ConfigError, match="recovery.kind"):
        validate({"method": {"name": "wanda"}, "recovery": {"kind": "replacement"}})
    with pytest.raises(ConfigError, match="recovery.kind"):
        validate({"recovery": {"kind": "distill"}})
