"""LoRA recovery: lowers the loss of a pruned tiny model, merges back to a plain checkpoint."""

from __future__ import annotations

import pytest
import torch

from pruning_core.checkpoint import load_pruned, save_pruned
from pruning_core.errors import ConfigError, DataError
from pruning_core.models import tiny_model
from pruning_core.plan import LayerPlan, PrunePlan
from pruning_core.recover import LoraSettings, default_targets, lora_recover, target_modules
from pruning_core.surgery import apply_plan

pytestmark = pytest.mark.usefixtures("one_thread")


def _pruned_tiny():
    model = tiny_model("llama", n_layers=2, seed=1)
    # layer 0 keeps KV group 1 (heads 2, 3) and 48 of 96 FFN channels; layer 1 keeps 64 channels
    plan = PrunePlan("test", {}, [LayerPlan(0, heads=[2, 3], kv_heads=[1], ffn=list(range(0, 96, 2))),
                                  LayerPlan(1, ffn=list(range(64)))])
    return apply_plan(model, plan)


def _data(n, L=32, seed=0):
    """A learnable stream: every block counts up modulo 17 from a random start."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 17, (n, 1), generator=g)
    return (start + torch.arange(L)) % 17 + 3


@torch.no_grad()
def _loss(model, ids):
    return float(model(input_ids=ids, labels=ids).loss)


def test_lora_lowers_loss_and_merges_to_plain_checkpoint(tmp_path):
    model = _pruned_tiny()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    train, held = _data(32), _data(8, seed=1)
    before = _loss(model, held)
    merged, info = lora_recover(model, None, train, {"steps": 40, "lr": 5e-3, "rank": 4, "batch_size": 8, "dropout": 0.0})
    after = _loss(merged, held)
    curve = info["loss_curve"]
    assert len(curve) == 40 and info["seconds"] > 0 and info["trainable_params"] > 0
    assert sum(curve[-5:]) / 5 < 0.8 * sum(curve[:5]) / 5
    assert after < 0.8 * before
    # plain model of the pruned shape: no peft wrappers, same tensors
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert {k: tuple(v.shape) for k, v in merged.state_dict().items()} == shapes
    assert not any("lora" in k for k in merged.state_dict())
    path = save_pruned(merged, None, None, tmp_path / "rec")
    again, _ = load_pruned(path)
    assert {k: tuple(v.shape) for k, v in again.state_dict().items()} == shapes
    with torch.no_grad():
        assert torch.allclose(again(input_ids=held).logits, merged(input_ids=held).logits, atol=1e-5)


def test_targets_and_settings():
    model = _pruned_tiny()
    assert default_targets(model) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    mods = target_modules(model, ["q_proj", "down_proj"])
    assert mods == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                    "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    with pytest.raises(ConfigError, match="targets"):
        target_modules(model, ["lm_head"])
    with pytest.raises(ConfigError, match="recovery.settings.rnk"):
        lora_recover(model, None, _data(4), {"rnk": 4})
    with pytest.raises(ConfigError, match="recovery.settings.steps"):
        lora_recover(model, None, _data(4), {"steps": 0})
    with pytest.raises(DataError, match="at least 200 tokens"):
        lora_recover(model, None, _data(4)[0], LoraSettings(steps=1, seq_len=200))
    # one 1-D token stream (what the pipeline passes) is cut into seq_len blocks
    _, info = lora_recover(model, None, _data(1, L=100)[0], {"steps": 2, "seq_len": 16, "batch_size": 2})
    assert len(info["loss_curve"]) == 2


def test_only_listed_targets_change():
    model = _pruned_tiny()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    merged, _ = lora_recover(model, None, _data(8), {"steps": 3, "lr": 1e-2, "targets": ["v_proj"], "dropout": 0.0})
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, ref[k])}
    assert changed and all(".v_proj." in k for k in changed)
