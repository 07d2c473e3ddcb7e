"""Cache keys and the retry policy."""

from __future__ import annotations

import torch

from pruning_core.errors import ConfigError
from tasks.cachekey import KeyParts
from tasks.common import is_retryable
from tasks.store import TransientStorageError


def test_retry_only_network_and_storage_errors():
    assert is_retryable(TransientStorageError("store.url", "s3://b", "a reachable store"))
    assert is_retryable(ConnectionResetError("reset"))
    assert not is_retryable(TimeoutError("slow"))  # a frozen endpoint fails once, in bounded time
    assert not is_retryable(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_retryable(MemoryError())
    assert not is_retryable(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_retryable(ConfigError("ratio", 2, "[0, 1)"))
    assert not is_retryable(FileNotFoundError("x"))


def test_step_key_depends_on_settings_inputs_revision_code_and_libraries_only():
    def key(**kw):
        parts = {"step": "score", "settings": {"method": "wanda"}, "inputs": ["a" * 64], "model_revision": "rev1",
                 "code": {"pruning_core.obs": "c1"}, "libraries": {"torch": "2.13.0"}}
        return KeyParts(**{**parts, **kw}).key()

    base = key()
    assert base == key()
    assert base != key(code={"pruning_core.obs": "c2"})
    assert base != key(settings={"method": "l2"})
    assert base != key(inputs=["b" * 64])
    assert base != key(model_revision="rev2")
    assert base != key(libraries={"torch": "2.14.0"})


def test_task_keys_ignore_device(tiny_llama_dir):
    from tasks import steps  # noqa: F401 - registers the step definitions
    from tasks.common import STEPS

    model = {"sha256": "r" * 16, "uri": str(tiny_llama_dir)}
    p = {"model": model, "source": "pydoc", "n_samples": 4, "seq_len": 32, "seed": 0}
    k_cpu = STEPS["calibration"].key({**p, "ctx": {"device": "cpu", "store": "/a"}})
    k_gpu = STEPS["calibration"].key({**p, "ctx": {"device": "cuda", "store": "/b"}})
    assert k_cpu == k_gpu
    assert k_cpu != STEPS["calibration"].key({**p, "seed": 1, "ctx": {}})


def test_prefect_retry_condition_on_failed_states():
    from types import SimpleNamespace

    from prefect.states import Failed

    from tasks.common import retry_condition

    task = SimpleNamespace(name="capture")
    assert retry_condition(task, None, Failed(data=ConnectionResetError("peer reset")))
    assert not retry_condition(task, None, Failed(data=torch.OutOfMemoryError("CUDA out of memory")))
    assert not retry_condition(task, None, Failed(data=RuntimeError("shape mismatch")))
