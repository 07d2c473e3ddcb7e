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


def test_query_heads_that_differ_between_layers_go_to_the_plugin(tmp_path):
    src = build("unservable", tmp_path / "src")  # layer 1 keeps 6 query heads, the others 8
    res = export_checkpoint(src, tmp_path / "out")
    assert res["layout"] == "plugin" and "layer 1 keeps 6" in res["why"] and res["blocks"] == 4
    cfg, before = _cfg(tmp_path / "out"), _cfg(src)
    assert cfg["architectures"] == ["PruneflowLlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["pruneflow_layers"] == before["pruneflow_layers"]  # the plugin reads pruneflow's own list
    assert {k: v for k, v in cfg.items() if k not in ("architectures", "pruneflow_export")} == \
        {k: v for k, v in before.items() if k != "architectures"}
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert not (tmp_path / "out" / "configuration_decilm.py").exists()  # no remote code


@pytest.mark.parametrize("kind", ["per_group_heads", "flap_bias", "attention_free_first", "qwen2_per_group_heads"])
def test_the_lightest_layout_for_every_kind(tmp_path, kind):
    from tests.serve_kinds import KINDS, LAYOUTS

    assert kind in KINDS
    assert export_checkpoint(build(kind, tmp_path / "src"), tmp_path / "out")["layout"] == LAYOUTS[kind]


def test_biases_decilm_cannot_build_go_to_the_plugin(tmp_path):
    from pruning_core.export import layout_for

    cfg = _cfg(build("ffn_widths", tmp_path / "src"))
    assert layout_for(cfg) == ("decilm", "one query-head count in every layer")
    cfg["pruneflow_layers"][2]["bias"] = ["o_proj", "down_proj"]  # FLAP's, on a model type without flags for them
    layout, why = layout_for(cfg)
    assert layout == "plugin" and "layer 2" in why and "o_proj" in why
    cfg["model_type"] = "qwen2"
    assert layout_for(cfg)[0] == "plugin"
    cfg["model_type"] = "opt"
    with pytest.raises(ConfigError, match="export.format.*'opt'"):
        layout_for(cfg)


def test_bad_inputs_are_one_line_errors(tmp_path):
    src = build("ffn_widths", tmp_path / "src")
    with pytest.raises(ConfigError, match="export.format: got 'tgi'; accepted: vllm"):
        export_checkpoint(src, tmp_path / "out", "tgi")
    with pytest.raises(DataError, match="checkpoint"):
        export_checkpoint(tmp_path / "nope", tmp_path / "out")
    cfg = _cfg(src)
    cfg["pruneflow_layers"][0] = {"kind": "attn", "ffn": 256}  # a layer kind no format has
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="layer 0 is 'attn'"):
        export_checkpoint(src, tmp_path / "out")
    cfg["pruneflow_layers"][0] = {"kind": "ffn", "ffn": 256}  # attention-free before any attention: DeciLM can't
    (src / "plan.json").unlink()
    (src / "config.json").write_text(json.dumps(cfg))
    res = export_checkpoint(src, tmp_path / "out")
    assert res["layout"] == "plugin" and "block 0" in res["why"]
