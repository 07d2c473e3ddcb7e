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


def test_empty_init_acts_only_in_its_own_thread():
    """While one thread builds a model on `meta` (`loading.empty_init` swaps nn.Module's
    register_parameter), a layer another thread builds — a Dask branch's pruned layer — gets real
    parameters (the threaded sweep failed with 'Cannot copy out of meta tensor' when it did not)."""
    from pruning_core.loading import empty_init

    inside, done = threading.Event(), threading.Event()

    def build_empty():
        with empty_init():
            assert torch.nn.Linear(4, 4).weight.device.type == "meta"
            inside.set()
            done.wait(10)

    t = threading.Thread(target=build_empty)
    t.start()
    try:
        assert inside.wait(10)
        assert torch.nn.Linear(4, 4).weight.device.type == "cpu"
    finally:
        done.set()
        t.join()
    assert torch.nn.Linear(4, 4).weight.device.type == "cpu"
