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
        validate({"recovery": {"kind": "qat"}})
    d = validate({"seed": 7, "recovery": {"kind": "distill", "settings": {"steps": 3}}}).recovery.settings
    assert d["steps"] == 3 and d["train"] == "decoder" and d["seed"] == 7  # the run's seed seeds the training


def test_one_rule_for_defaults_no_file_empty_file_and_a_file(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    partial = tmp_path / "partial.yaml"
    partial.write_text("ratio: 0.2\n")
    none_, e, p = build_spec(), build_spec(empty), build_spec(partial)
    assert none_.model_dump() == e.model_dump() == p.model_dump()
    assert e.method.settings["gqa"] == "per_group" and e.evaluation.tasks == DEFAULT_SPEC["evaluation"]["tasks"]
    # a file's own values go over the defaults field by field (the rest of the section keeps its defaults)
    f = tmp_path / "f.yaml"
    f.write_text("calibration: {n_samples: 4}\n")
    s = build_spec(f)
    assert s.calibration.n_samples == 4 and s.calibration.seq_len == DEFAULT_SPEC["calibration"]["seq_len"]


def test_the_default_recovery_belongs_to_the_embedded_default_model(tmp_path):
    """Distillation is the embedded default's measured recipe; another model starts without recovery, and
    another recovery kind never gets distillation's settings."""
    d = build_spec().recovery
    assert d.kind == "distill" and d.settings["mix_samples"] == 64 and d.settings["steps"] == 30
    assert build_spec(None, **{"method.name": "l2"}).recovery.kind == "distill"  # any method of that model
    other = build_spec(None, **{"model.ref": str(tmp_path / "llama")})
    assert other.recovery.kind == "none" and other.recovery.settings == {}
    mine = build_spec(None, ["recovery.kind=distill", "recovery.settings.steps=5"], **{"model.ref": "x/y"})
    assert mine.recovery.kind == "distill" and mine.recovery.settings["steps"] == 5
    from pruning_core.distill import parse_settings

    assert mine.recovery.settings == parse_settings({"steps": 5, "seed": 0}).model_dump(mode="json")
    lora = build_spec(None, ["recovery.kind=lora"]).recovery
    assert lora.kind == "lora" and "train" not in lora.settings and lora.settings["rank"] == 8
    assert build_spec(None, ["recovery.kind=none"]).recovery.kind == "none"


@pytest.mark.parametrize("method", ["llm-rank", "mpr", "shortgpt", "llm-streamline", "slimgpt", "l2"])
def test_a_method_never_gets_another_methods_default_settings(tmp_path, method):
    from pruning_core.methods import get_method

    own = get_method(method).parse_settings({}).model_dump(mode="json")
    assert build_spec(None, **{"method.name": method}).method.settings == own
    f = tmp_path / "m.yaml"
    f.write_text(f"method: {{name: {method}}}\n")
    assert build_spec(f).method.settings == own
    assert build_spec(None, [f"method.name={method}"]).method.settings == own
    # the user's own settings for that method are kept
    if "n_layers" in own:
        assert build_spec(None, [f"method.name={method}", "method.settings.n_layers=3"]).method.settings["n_layers"] == 3
