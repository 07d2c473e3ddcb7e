"""Races between threads of one process (the threads task runner): a layer's hold count and read,
and SlimGPT's TF32 switch."""

from __future__ import annotations

import threading

import torch
from torch import nn

from pruning_core import residency
from pruning_core.adapters import adapter_for
from pruning_core.methods.slimgpt import SlimGPTSettings, prune
from pruning_core.models import tiny_model


class _SlowFiles:
    """A layer's checkpoint files whose first read waits until the test lets it go."""

    def __init__(self, tensors: dict, reading: threading.Event, go: threading.Event):
        self.tensors, self.reading, self.go, self.reads = tensors, reading, go, 0

    def key(self, name):
        return name if name in self.tensors else None

    def read(self, names):
        self.reads += 1
        if self.reads == 1:
            self.reading.set()
            self.go.wait(30)
        return {n: self.tensors[n].clone() for n in names}

    def spill(self, tensors):
        self.tensors.update({k: v.detach().clone() for k, v in tensors.items()})


def test_a_second_thread_bringing_a_layer_waits_for_the_first_ones_read():
    layer = nn.Linear(4, 4)
    weights = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    reading, go = threading.Event(), threading.Event()
    files = _SlowFiles(weights, reading, go)
    layer._pf_home = residency.Home("disk", torch.device("cpu"), "", files)
    residency.to_meta(layer)
    seen = {}

    def first():
        residency.bring(layer)
        seen["first"] = residency.is_resident(layer)

    def second():
        residency.bring(layer)  # while the first thread is still reading the layer
        seen["second"] = residency.is_resident(layer)

    a = threading.Thread(target=first)
    a.start()
    assert reading.wait(30)
    b = threading.Thread(target=second)
    b.start()
    b.join(1.0)  # unlocked: the second bring returned at once, on `meta` tensors
    go.set()
    a.join(30)
    b.join(30)
    assert seen == {"first": True, "second": True}
    assert residency.home_of(layer).held == 2
    residency.release(layer)
    assert residency.is_resident(layer)  # still held by the other thread
    residency.release(layer)
    assert not residency.is_resident(layer) and residency.home_of(layer).held == 0


def _model():
    return tiny_model("llama", n_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                      num_key_value_heads=2)


def test_slimgpt_in_two_threads_never_runs_with_tf32_and_leaves_the_setting_as_it_was():
    """A starts, B starts, A ends while B still works: B must still run without TF32, and once both are
    done the process has TF32 as before (flipping the global flag per call left it off for good, and
    B running with it on)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()
    flags = {"a": [], "b": []}

    def progress_a(i, n):
        flags["a"].append(torch.backends.cuda.matmul.allow_tf32)
        if i == 1:
            a_in.set()
            b_in.wait(60)  # both inside before A goes on

    def progress_b(i, n):
        flags["b"].append(torch.backends.cuda.matmul.allow_tf32)
        if i == 1:
            b_in.set()
            a_done.wait(60)  # B's next layers run after A has finished

    def run(progress, done=None):
        m = _model()
        prune(m, adapter_for(m), ids, 0.3, SlimGPTSettings(schedule="uniform"), progress=progress)
        if done is not None:
            done.set()

    try:
        a = threading.Thread(target=run, args=(progress_a, a_done))
        a.start()
        assert a_in.wait(120)
        b = threading.Thread(target=run, args=(progress_b,))
        b.start()
        a.join(120)
        b.join(120)
        assert len(flags["a"]) == 2 and len(flags["b"]) == 2
        assert flags == {"a": [False, False], "b": [False, False]}
        assert torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
