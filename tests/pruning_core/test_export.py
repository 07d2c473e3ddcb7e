"""pruning_core.export: the vLLM folder of every checkpoint kind (format only; tests/serve runs a real vLLM)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from pruning_core.errors import ConfigError, DataError
from pruning_core.export import export_checkpoint
from tests.serve_kinds import build

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(path):
    return json.loads((path / "config.json").read_text())


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_uniform_is_copied_byte_for_byte(tmp_path):
    src = build("uniform", tmp_path / "src")
    res = export_checkpoint(src, tmp_path / "out")
    assert res["layout"] == "stock"
    for name in ("config.json", "model.safetensors", "plan.json"):
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()
    assert _cfg(tmp_path / "out")["architectures"] == ["LlamaForCausalLM"]


def test_ffn_replacement_and_removed_layer_blocks(tmp_path):
    src = build("ffn_replacement", tmp_path / "src")  # layers 1-2 -> one residual FFN; layer 3 FFN 160
    out = tmp_path / "out"
    assert export_checkpoint(src, out)["layout"] == "decilm"
    cfg = _cfg(out)
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and cfg["model_type"] == "nemotron-nas"
    assert "pruneflow_layers" not in cfg and cfg["num_hidden_layers"] == 4
    assert cfg["num_attention_heads"] == 8 and cfg["head_dim"] == 32 and cfg["hidden_size"] == 128
    blocks = [(b["attention"]["no_op"], b["attention"]["n_heads_in_group"], b["ffn"]["no_op"],
               b["ffn"]["intermediate_size"]) for b in cfg["block_configs"]]
    assert blocks == [(False, 2, False, 256), (True, None, False, 256), (True, None, True, None), (False, 2, False, 160)]
    # block i is the input model's layer i: the replacement's norm becomes post_attention_layernorm,
    # the removed layer (block 2) has no tensors, the source's layer 2 is block 3
    s, e = _tensors(src), _tensors(out)
    assert torch.equal(e["model.layers.1.post_attention_layernorm.weight"], s["model.layers.1.norm.weight"])
    assert torch.equal(e["model.layers.1.mlp.down_proj.weight"], s["model.layers.1.mlp.down_proj.weight"])
    assert torch.equal(e["model.layers.3.mlp.down_proj.weight"], s["model.layers.2.mlp.down_proj.weight"])
    assert not any(k.startswith("model.layers.2.") for k in e)
    assert not any(".self_attn." in k for k in e if k.startswith("model.layers.1."))
    assert len(e) == len(s)


def test_per_layer_kv_heads_with_equal_query_heads(tmp_path):
    src = build("uniform_heads", tmp_path / "src")  # 4 query heads everywhere: 2 KV groups or 4
    export_checkpoint(src, tmp_path / "out")
    cfg = _cfg(tmp_path / "out")
    assert cfg["num_attention_heads"] == 4
    assert [b["attention"]["n_heads_in_group"] for b in cfg["block_configs"]] == [2, 1, 2, 1]
    assert [b["ffn"]["intermediate_size"] for b in cfg["block_configs"]] == [224, 128, 256, 64]
    assert _tensors(tmp_path / "out").keys() == _tensors(src).keys()  # no renaming needed


def test_config_module_reads_blocks_as_attributes(tmp_path):
    src = build("removed_layer", tmp_path / "src")
    out = tmp_path / "out"
    export_checkpoint(src, out)
    spec = importlib.util.spec_from_file_location("configuration_decilm_test", out / "configuration_decilm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.DeciLMConfig.from_pretrained(out)
    b = cfg.block_configs
    assert [x.attention.no_op for x in b] == [False, True, False, False]
    assert [x.ffn.no_op for x in b] == [False, True, False, False]
    assert b[0].ffn.intermediate_size == 200 and not hasattr(b[0].ffn, "ffn_mult")
    assert cfg.to_dict()["block_configs"] == _cfg(out)["block_configs"]


def test_query_heads_that_differ_between_layers_are_refused(tmp_path):
    src = build("unservable", tmp_path / "src")
    with pytest.raises(ConfigError) as e:
        export_checkpoint(src, tmp_path / "out")
    msg = str(e.value)
    assert "layer 1 keeps 6" in msg and "servable: vllm" in msg and "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_one_line_errors(tmp_path):
    src = build("ffn_widths", tmp_path / "src")
    with pytest.raises(ConfigError, match="export.format: got 'tgi'; accepted: vllm"):
        export_checkpoint(src, tmp_path / "out", "tgi")
    with pytest.raises(DataError, match="checkpoint"):
        export_checkpoint(tmp_path / "nope", tmp_path / "out")
    cfg = _cfg(src)
    cfg["pruneflow_layers"][0] = {"kind": "ffn", "ffn": 256}  # an attention-free block before any attention
    (src / "plan.json").unlink()
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="block 0"):
        export_checkpoint(src, tmp_path / "out")
