"""What every step shares: cache keys, the store-backed step cache, retry policy, loaded models.

Cache key of a step = sha256 of {step name, the step's code version, its own settings, the sha256 of
every input artifact, the model revision}. Device, logging and progress settings are never part of it.
The code version hashes the task's source and the `pruning_core` modules the step calls, so editing
the maths invalidates exactly the steps that use it.

Two cache layers, one key:

* Prefect's (`cache_key_fn` + persisted results): a hit never enters the task body (state `Cached`).
  The key function first checks that the artifact the key points to is committed and intact in
  the store; if not, it warns and returns no key, so the step recomputes.
* the store's index (`index/<step>/<key>.json`): survives the loss of Prefect's result records and
  is shared by every worker that uses the same store (e.g. on S3).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from pruning_core.errors import PruneflowError, StorageError

from .store import TransientStorageError, _is_transient, open_store

log = logging.getLogger("pruneflow.tasks")

# bump by hand when a step's *meaning* changes in a way its source hash would not show
STEP_EPOCH = "1"


# -- code versions ---------------------------------------------------------------------------------
_CODE: dict[tuple, str] = {}


def code_version(*objs: Any) -> str:
    """sha256 (16 hex) of the source of the given functions / modules (by module name too)."""
    key = tuple(o if isinstance(o, str) else id(o) for o in objs)
    if key in _CODE:
        return _CODE[key]
    h = hashlib.sha256(STEP_EPOCH.encode())
    for o in objs:
        try:
            if isinstance(o, str):
                import importlib

                o = importlib.import_module(o)
            h.update(inspect.getsource(o).encode())
        except (OSError, TypeError, ModuleNotFoundError):
            h.update(repr(o).encode())
    _CODE[key] = h.hexdigest()[:16]
    return _CODE[key]


def step_key(step: str, code: str, settings: dict, inputs: list[dict | None], model_revision: str | None) -> str:
    payload = {
        "step": step,
        "code": code,
        "settings": settings,
        "inputs": [None if m is None else m["sha256"] for m in inputs],
        "model_revision": model_revision,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


# -- retries ---------------------------------------------------------------------------------------
def is_retryable(exc: BaseException | None) -> bool:
    """Network / storage hiccups only; never shape errors, user errors or out-of-memory."""
    if exc is None:
        return False
    if isinstance(exc, TransientStorageError):
        return True
    if isinstance(exc, (PruneflowError, MemoryError)):
        return False
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return False
    except (ImportError, AttributeError):
        pass
    if isinstance(exc, (RuntimeError, ValueError, TypeError, KeyError, IndexError, FileNotFoundError)):
        return False
    return _is_transient(exc)


def retry_condition(task, task_run, state) -> bool:
    try:
        state.result()
    except BaseException as e:  # noqa: BLE001 - this *is* the failure being inspected
        ok = is_retryable(e)
        if ok:
            log.warning("task %s failed with a transient error (%s); retrying", task.name, type(e).__name__)
        return ok
    return False


# -- step specs ------------------------------------------------------------------------------------
class StepDef:
    """How to key one step: `keyparts(params) -> (settings, inputs, model_revision)` and its code."""

    def __init__(self, name: str, keyparts: Callable[[dict], tuple[dict, list, str | None]], code: Callable[[dict], str]):
        self.name, self.keyparts, self.code = name, keyparts, code

    def key(self, params: dict) -> str:
        settings, inputs, rev = self.keyparts(params)
        return step_key(self.name, self.code(params), settings, inputs, rev)


STEPS: dict[str, StepDef] = {}


def define_step(name: str, keyparts, code) -> StepDef:
    STEPS[name] = StepDef(name, keyparts, code)
    return STEPS[name]


def _valid(store, man: dict) -> bool:
    if man.get("external"):  # a model folder outside the store: valid while its fingerprint holds
        from .steps import model_valid

        ok = model_valid(man)
        if not ok:
            log.warning("model folder %s changed or vanished; reloading", man.get("uri"))
        return ok
    return store.valid(man)


def cache_key_fn_for(step: str):
    """A Prefect cache_key_fn: the step key, or None (recompute) when its artifact is gone or torn."""

    def fn(context, parameters: dict) -> str | None:
        sd = STEPS[step]
        key = sd.key(parameters)
        store = open_store(parameters.get("ctx", {}).get("store"))
        try:
            man = store.lookup(step, key)
        except StorageError:
            return None
        if man is None:
            return None  # never completed with this store: compute (Prefect records are not trusted alone)
        if not _valid(store, man):
            log.warning("step %s: cached artifact missing or corrupt; recomputing", step)
            return None
        return f"pruneflow-{step}-{key}"

    fn.__name__ = f"cache_key_{step}"
    return fn


def run_step(step: str, params: dict, compute: Callable[[], dict]) -> dict:
    """The task body: reuse the store's record for this key when intact, else compute and record."""
    sd = STEPS[step]
    key = sd.key(params)
    store = open_store(params.get("ctx", {}).get("store"))
    t0 = time.perf_counter()
    man = store.lookup(step, key)
    if man is not None:
        if _valid(store, man):
            return {**man, "step": step, "key": key, "hit": True, "seconds": time.perf_counter() - t0}
        log.warning("step %s: cached artifact missing or corrupt; recomputing", step)
    log.info("step %s: computing (key %s)", step, key[:12])
    man = compute()
    man = {**man, "step": step, "key": key}
    man.pop("hit", None)
    man.pop("seconds", None)
    store.record(step, key, man)
    return {**man, "hit": False, "seconds": time.perf_counter() - t0}


# -- loaded models (one process may run several steps on the same model) ----------------------------
_MODELS: dict[tuple, tuple] = {}
_MODELS_LOCK = threading.Lock()


def load_model_cached(path: str, dtype: str, device: str, trust_remote_code: bool = False,
                      placement: str = "device"):
    """(model, tokenizer) loaded once per process, read-only: one model at a time (the previous one is
    dropped before the next is read). A step that modifies the model opens its own (`placement.open_model`)."""
    from pruning_core.models import load_model

    key = (str(path), dtype, str(device), trust_remote_code, placement)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS.clear()
            _MODELS[key] = load_model(str(path), device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                      placement=placement)
        return _MODELS[key]


def clear_models() -> None:
    with _MODELS_LOCK:
        _MODELS.clear()


def progress_enabled() -> bool:
    return os.environ.get("PRUNEFLOW_QUIET", "") not in ("1", "true")
