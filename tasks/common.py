"""What every step shares: cache keys, the store-backed step cache, retry policy, loaded models.

Cache key of a step = digest of {step name, its own settings, the sha256 of every input artifact, the
model revision, its code (the import closure of the task function, `tasks.cachekey`), the versions of
the libraries that change its results}. Device, logging and progress settings are never part of it.
A miss records why (which of those parts is new) in the log and in the step's manifest.

Two cache layers, one key:

* Prefect's (`cache_key_fn` + persisted results): a hit never enters the task body (state `Cached`).
  The key function first checks that the artifact the key points to is committed and intact in
  the store; if not, it warns and returns no key, so the step recomputes.
* the store's index (`index/<step>/<key>.json`): survives the loss of Prefect's result records and
  is shared by every worker that uses the same store (e.g. on S3).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pruning_core.errors import PruneflowError, StorageError

from .cachekey import KeyParts, code_parts, explain_miss, format_reason, library_versions
from .store import TransientStorageError, _is_transient, open_store

log = logging.getLogger("pruneflow.tasks")


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
    """How to key one step.

    `keyparts(params) -> (settings, inputs, model_revision)`; `code(params) -> roots` names the functions
    and modules the step runs (their import closure is computed); `libraries` adds library names to
    `cachekey.BASE_LIBRARIES`."""

    def __init__(self, name: str, keyparts: Callable[[dict], tuple[dict, list, str | None]],
                 code: Callable[[dict], list], libraries: tuple[str, ...] = (),
                 lineage: Callable[[dict], str | None] | None = None):
        self.name, self.keyparts, self.code, self.libraries = name, keyparts, code, libraries
        self.lineage = lineage

    def parts(self, params: dict) -> KeyParts:
        settings, inputs, rev = self.keyparts(params)
        return KeyParts(self.name, settings, [None if m is None else m["sha256"] for m in inputs], rev,
                        code=code_parts(*self.code(params)), libraries=library_versions(self.libraries),
                        lineage=self.lineage(params) if self.lineage else None)

    def key(self, params: dict) -> str:
        return self.parts(params).key()


STEPS: dict[str, StepDef] = {}


def define_step(name: str, keyparts, code, libraries: tuple[str, ...] = (), lineage=None) -> StepDef:
    STEPS[name] = StepDef(name, keyparts, code, libraries, lineage)
    return STEPS[name]


def model_valid(man: dict) -> bool:
    """A model folder outside the store is valid while its fingerprint (names, sizes, mtimes) holds."""
    from pruning_core.models import model_revision

    return Path(man["uri"]).exists() and model_revision(man["uri"]) == man["fingerprint"]


def _valid(store, man: dict) -> bool:
    if man.get("external"):
        ok = model_valid(man)
        if not ok:
            log.warning("model folder %s changed or vanished; reloading", man.get("uri"))
        return ok
    return store.valid(man)


def cache_key_fn_for(step: str):
    """A Prefect cache_key_fn: the step key, or None (recompute) when its artifact is gone or torn."""

    def fn(context, parameters: dict) -> str | None:
        key = STEPS[step].key(parameters)
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
        # Prefect keeps its result records in one place for every store: the record names the store, or a
        # run on store B would be handed a manifest that points into store A
        return f"pruneflow-{step}-{key}-{hashlib.sha256(store.url.encode()).hexdigest()[:10]}"

    fn.__name__ = f"cache_key_{step}"
    return fn


def run_step(step: str, params: dict, compute: Callable[[], dict]) -> dict:
    """The task body: reuse the store's record for this key when intact, else compute and record.

    Computing holds the store's lock for (step, key): a second run of the same step (another process,
    another worker on the same S3 store) waits and then reuses the first one's artifact."""
    parts = STEPS[step].parts(params)
    key = parts.key()
    store = open_store(params.get("ctx", {}).get("store"))
    t0 = time.perf_counter()

    def cached() -> dict | None:
        man = store.lookup(step, key)
        if man is None:
            return None
        if _valid(store, man):
            return {**man, "step": step, "key": key, "hit": True, "seconds": time.perf_counter() - t0}
        log.warning("step %s: cached artifact missing or corrupt; recomputing", step)
        return None

    if (hit := cached()) is not None:
        return hit
    with store.lock(f"{step}-{key}", wait_message=f"step {step}: another run is computing it; waiting"):
        if (hit := cached()) is not None:  # the run we waited for computed it
            return hit
        why = explain_miss(store.history(step), parts)
        log.info("step %s: computing (key %s): %s", step, key[:12], format_reason(why))
        with step_scope():
            man = compute()
        man = {**man, "step": step, "key": key}
        man.pop("hit", None)
        man.pop("seconds", None)
        store.record(step, key, man, parts.summary())
    return {**man, "hit": False, "why": why, "seconds": time.perf_counter() - t0}


# -- loaded models (one process may run several steps on the same model) ----------------------------
# key -> (model, tokenizer); and key -> the threads that took it and have not let it go yet. With the
# threads task runner several steps run at once: a thread's `clear_models` lets go of *its* models only,
# and a model is dropped once no live thread holds it (never under another thread's feet).
_MODELS: dict[tuple, tuple] = {}
_USERS: dict[tuple, set[threading.Thread]] = {}
_MODELS_LOCK = threading.RLock()
# Steps that compute on the same shared model take turns. The engine registers hooks on the model's
# modules and swaps its layers for catchers while it catches their inputs; the search tables prune one
# projection for a moment. On a model another thread is running, each of these changed what that thread
# computed (a threads / Dask-threads sweep's results depended on timing). A step holds the lock of every
# shared model it opens until its compute ends; steps on different models still run side by side.
_USE_LOCKS: dict[tuple, threading.RLock] = {}
_SCOPE = threading.local()


@contextmanager
def step_scope() -> Iterator[None]:
    """One step's compute: the shared models it opens (`load_model_cached`) are its own until it ends."""
    if getattr(_SCOPE, "held", None) is not None:  # nested: the outer scope releases
        yield
        return
    _SCOPE.held = []
    try:
        yield
    finally:
        held, _SCOPE.held = _SCOPE.held, None
        for lock in reversed(held):
            lock.release()


def _hold(key: tuple) -> None:
    """Inside a step scope: wait for the other steps computing on this shared model, then hold it."""
    held = getattr(_SCOPE, "held", None)
    if held is None:
        return
    with _MODELS_LOCK:
        lock = _USE_LOCKS.setdefault(key, threading.RLock())
    if lock not in held:
        lock.acquire()  # never while holding _MODELS_LOCK: the holder may need it to finish
        held.append(lock)


def load_model_cached(path: str, dtype: str, device: str, trust_remote_code: bool = False,
                      placement: str = "device"):
    """(model, tokenizer) loaded once per process, shared by the threads that ask for it. A thread holds
    one model at a time (its previous one is let go before the next is read). Inside a step scope the
    step has the model to itself until its compute ends (`step_scope`). A step that modifies the model
    for good opens its own (`loading.open_model`)."""
    from pruning_core.models import load_model

    key = (str(path), dtype, str(device), trust_remote_code, placement)
    me = threading.current_thread()
    _hold(key)
    with _MODELS_LOCK:
        if key not in _MODELS:
            clear_models()
            _MODELS[key] = load_model(str(path), device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                      placement=placement)
        else:  # let go of this thread's other models
            for k in [k for k, users in _USERS.items() if me in users and k != key]:
                _release(k, me)
        _USERS.setdefault(key, set()).add(me)
        return _MODELS[key]


def _release(key: tuple, thread: threading.Thread) -> None:
    users = _USERS.get(key, set())
    users.discard(thread)
    # threads, not their idents: an ident is reused once its thread ends, and a dead step's model
    # must not stay cached because a new thread happens to carry the same number
    if not any(t.is_alive() for t in users):
        _MODELS.pop(key, None)
        _USERS.pop(key, None)


def clear_models() -> None:
    """Let go of the models this thread took, and give their memory back once no other (live) thread
    holds them, before another is read (a thread never holds two at once)."""
    import gc

    me = threading.current_thread()
    with _MODELS_LOCK:
        for k in list(_MODELS):
            _release(k, me)
        gc.collect()
    from pruning_core.residency import _trim

    _trim()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # the dropped models' blocks go back to the device, not the allocator's cache


def progress_enabled() -> bool:
    return os.environ.get("PRUNEFLOW_QUIET", "") not in ("1", "true")


# The terminal's stream while the console (flows/console.py) sends stray library output on stderr
# to the run's log: progress bars are drawn on this one.
CONSOLE_STREAM: list = [None]


def console_stream():
    import sys

    return CONSOLE_STREAM[0] or sys.stderr


def console_is_terminal() -> bool:
    try:
        return bool(console_stream().isatty())
    except (AttributeError, ValueError, OSError):
        return False


def progress_lines(desc: str, unit: str = "layer", parts: int = 4):
    """The callback `cb(done, total, *extra)` of a progress bar when the console is not a terminal:
    nothing redrawn. Training (`unit="step"`) prints a line at each quarter of its steps
    (`  lora: step 50/200  loss 2.31`); layer-wise work prints nothing (its step's line follows)."""
    printed: set[int] = set()

    def cb(done, total=None, *extra):
        if unit != "step" or not total:
            return
        q = done * parts // total
        if q < 1 or q in printed:
            return
        printed.add(q)
        loss = f"  loss {extra[0]:.4g}" if extra and isinstance(extra[0], float) else ""
        stream = console_stream()
        stream.write(f"  {desc.strip()}: {unit} {done}/{total}{loss}\n")
        stream.flush()

    return cb
