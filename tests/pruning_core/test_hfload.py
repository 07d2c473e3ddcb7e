"""Loads in threads of one process must not leave transformers' load-time patches behind (the root of a
suite that failed only in some orders: after a threaded sweep, every tied model loaded with lm_head on
the meta device)."""

from __future__ import annotations

import threading

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from pruning_core.checkpoint import load_pruned


def test_threaded_loads_leave_tie_weights_alone(tmp_path):
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    original = PreTrainedModel.tie_weights
    init = torch.nn.init.normal_
    errors = []

    def load():
        try:
            for _ in range(8):
                load_pruned(tmp_path, device="cpu")
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert PreTrainedModel.tie_weights is original and torch.nn.init.normal_ is init
    m, _ = load_pruned(tmp_path, device="cpu")
    assert m.lm_head.weight.device.type == "cpu"
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
