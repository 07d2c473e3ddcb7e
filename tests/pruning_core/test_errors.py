"""Every user error names the field, the value and what is accepted, on one line."""

import pytest
import torch

from pruning_core import (
    ConfigError,
    DataError,
    PruneflowError,
    adapter_for,
    get_method,
    load_model,
    plan_from_scores,
    prune,
    tiny_model,
)
from pruning_core.methods import list_methods
from pruning_core.models import resolve_device


def one_line(e):
    s = str(e)
    assert "\n" not in s and "accepted:" in s
    return s


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "0.2", True])
def test_ratio_out_of_range(ratio):
    m = tiny_model("llama", n_layers=1)
    with pytest.raises(ConfigError) as e:
        prune(m, "l2", None, ratio)
    assert one_line(e.value).startswith("ratio: got")


def test_ratio_that_empties_a_layer():
    m = tiny_model("llama", n_layers=2)
    scores = {f"heads.{i}": torch.rand(4) for i in range(2)}
    with pytest.raises(ConfigError) as e:
        plan_from_scores(m, adapter_for(m), scores, 0.8, targets=("heads",))
    assert "keeps at least one KV group in layer 0" in one_line(e.value)


def test_unknown_method_and_settings():
    with pytest.raises(ConfigError) as e:
        get_method("sparsegpt")
    assert "method.name: got 'sparsegpt'" in one_line(e.value) and "l2" in str(e.value)
    with pytest.raises(ConfigError) as e:
        get_method("l2").parse_settings({"gqa": "ragged"})
    assert one_line(e.value).startswith("method.settings.gqa")
    with pytest.raises(ConfigError) as e:
        get_method("l2").parse_settings({"bogus": 1})
    assert "method.settings.bogus" in one_line(e.value) and "gqa" in str(e.value)


def test_unknown_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ConfigError) as e:
        adapter_for(m)
    assert "model.architecture: got 'gpt2'" in one_line(e.value) and "llama" in str(e.value) and "opt" in str(e.value)


def test_missing_model_path(tmp_path):
    with pytest.raises(DataError) as e:
        load_model(str(tmp_path / "nope"))
    assert one_line(e.value).startswith("model: got")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="config.json"):
        load_model(str(tmp_path / "empty"))


def test_bad_device_and_dtype():
    with pytest.raises(ConfigError, match="device"):
        resolve_device("tpu")
    with pytest.raises(ConfigError, match="model.dtype"):
        load_model("smollm2-135m", dtype="int8")


def test_registry_lists_baselines():
    names = {m.name for m in list_methods()}
    assert {"random", "l1", "l2", "activation", "wanda"} <= names
    assert issubclass(ConfigError, PruneflowError) and PruneflowError.exit_code == 2
