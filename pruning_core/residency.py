"""Where a decoder layer's weights live while a step runs: `model.placement = device | offload | disk`
(`auto` is resolved to one of them by `memory.choose_placement`).

* `device`  — the whole model on the working device.
* `offload` — everything but the decoder layers on the device; each decoder layer lives in host
  memory and is moved to the device only while it runs.
* `disk`    — everything but the decoder layers on the device; a decoder layer's parameters stay in
  the checkpoint's safetensors files (the module holds `meta` tensors of the right shapes) and are
  read when the layer runs and dropped after. A layer a method modifies is spilled to a scratch
  safetensors file when it is released, and read back from there. Spills live in a folder
  `pruneflow-spill-<pid>.<host digest>-*` in `$PRUNEFLOW_SCRATCH` (else `$TMPDIR`), removed when the
  model goes; the tag in its name lets a cleaner tell a killed process's spill from a live one's.

The mechanics are one small state object per decoder layer (`layer._pf_home`) and two hooks: a
forward pre-hook brings the layer (reads / moves it) and a forward hook releases it, with a hold
count so that a consumer that runs a layer many times (a pass of `engine.run_pass`) brings it once. So
every forward of the model — perplexity, lm-eval's HFLM, Streamline's teacher — works unchanged
under every placement, and the same numbers come out (`tests/pruning_core/test_placement.py`).
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import DataError
from .weightfiles import TensorFiles


@dataclass
class Home:
    mode: str  # "offload" | "disk"
    device: torch.device  # where the layer runs
    prefix: str = ""  # "model.layers.3." (disk: the tensor names in `files`)
    files: TensorFiles | None = None
    held: int = 0
    digest: str | None = field(default=None, repr=False)


def home_of(layer: nn.Module) -> Home | None:
    return getattr(layer, "_pf_home", None)


def _own_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers (what the checkpoint holds), by name relative to module."""
    return dict(module.state_dict(keep_vars=True))


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = module.get_submodule(mod_name) if mod_name else module
    if leaf in mod._parameters:
        old = mod._parameters[leaf]
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=bool(old is not None and old.requires_grad))
    else:
        mod._buffers[leaf] = value


def to_meta(module: nn.Module) -> None:
    """Drop the data of `module`'s checkpoint tensors, keeping names, shapes and dtypes."""
    for name, t in _own_tensors(module).items():
        if t is not None and t.device.type != "meta":
            _set_tensor(module, name, torch.empty_like(t, device="meta"))


def _digest(module: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(_own_tensors(module).items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        if t.device.type != "meta":
            b = t.detach().contiguous().cpu().reshape(-1)
            h.update(b.view(torch.uint8).numpy().tobytes() if b.numel() else b"")
    return h.hexdigest()


# one lock per layer: with the threads task runner two steps may run the same (shared, cached) model, so
# the hold count and the read / drop of a layer's data happen under it (a second thread's `bring` waits
# for the first one's read instead of running on `meta` tensors)
_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _layer_lock(layer: nn.Module) -> threading.RLock:
    with _LOCKS_GUARD:
        lock = _LOCKS.get(layer)
        if lock is None:
            lock = _LOCKS[layer] = threading.RLock()
        return lock


def is_resident(layer: nn.Module) -> bool:
    return all(t.device.type != "meta" for t in _own_tensors(layer).values() if t is not None)


def bring(layer: nn.Module, device: torch.device | None = None, track_changes: bool = False) -> nn.Module:
    """Make `layer` usable on its working device (or `device`); nested calls just count."""
    h = home_of(layer)
    if h is None:
        return layer
    with _layer_lock(layer):
        try:
            return _bring(layer, h, device, track_changes)
        except BaseException:
            h.held = max(0, h.held - 1)  # a failed read holds nothing
            raise


def _bring(layer: nn.Module, h: Home, device: torch.device | None, track_changes: bool) -> nn.Module:
    h.held += 1
    if h.held > 1:
        return layer
    dev = device or h.device
    if h.mode == "offload":
        layer.to(dev)
    else:
        install(layer, read_layer(layer, h), dev)
        if track_changes:
            h.digest = _digest(layer)
    return layer


def release(layer: nn.Module, write_back: bool | None = None) -> None:
    """Undo one `bring`. On the last one: offload moves the layer back to host memory; disk drops
    its data (first spilling it when `write_back`, or when it changed and changes were tracked)."""
    h = home_of(layer)
    if h is None:
        return
    with _layer_lock(layer):
        _release(layer, h, write_back)


def _release(layer: nn.Module, h: Home, write_back: bool | None) -> None:
    h.held = max(0, h.held - 1)
    if h.held:
        return
    if h.mode == "offload":
        layer.to("cpu")
        _trim()
        return
    if write_back is None:
        write_back = h.digest is not None and _digest(layer) != h.digest
    if write_back and h.files is not None:
        h.files.spill({h.prefix + n: t for n, t in _own_tensors(layer).items() if t is not None})
    h.digest = None
    to_meta(layer)
    _trim()


def read_layer(layer: nn.Module, h: Home) -> dict[str, torch.Tensor]:
    """The data of a `disk` layer's `meta` tensors from its files (CPU, the file's dtype); safe to call
    from a prefetch thread. A tensor a method added to a layer that was not resident (FLAP's zero
    biases) is not in the files yet: it starts as zeros, as it would have on the device."""
    if h.files is None:
        raise DataError("model.placement", "disk", "a layer still backed by its checkpoint files")
    own = {n: t for n, t in _own_tensors(layer).items() if t is not None}
    missing = [n for n, t in own.items() if t.device.type == "meta"]
    new = [n for n in missing if h.files.key(h.prefix + n) is None]
    got = h.files.read([h.prefix + n for n in missing if n not in new])
    out = {n: got[h.prefix + n] for n in missing if n not in new}
    out.update({n: torch.zeros(own[n].shape, dtype=own[n].dtype) for n in new})
    return out


def install(layer: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Put `tensors` (by name in the layer) into the layer on `device`, in the dtypes the layer declares."""
    own = _own_tensors(layer)
    for n, t in tensors.items():
        _set_tensor(layer, n, t.to(device=device, dtype=own[n].dtype))


def pinned(t: torch.Tensor) -> torch.Tensor:
    """`t` in page-locked host memory when CUDA is present (copies to the device can then overlap
    compute); on a CPU-only machine `t` itself."""
    if torch.cuda.is_available() and not t.is_pinned():
        return t.pin_memory()
    return t


_HOST_LOCK = threading.Lock()


def host_copies(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The pinned host copy of an `offload` layer: its host tensors are replaced by pinned ones once.
    A tensor something else put there since (this module's own hooks move a layer with `.to`, which
    leaves unpinned copies) replaces its stale entry, so no layer is held twice in host memory."""
    with _HOST_LOCK:
        host = getattr(layer, "_pf_host", None)
        if host is None:
            host = layer._pf_host = {}
        for n, t in _own_tensors(layer).items():
            if t is None or t.device.type != "cpu":
                continue
            if n not in host or host[n].data_ptr() != t.data_ptr():
                host[n] = pinned(t.detach())
                _set_tensor(layer, n, host[n])
        return host


def release_offloaded(layer: nn.Module, changed: bool) -> None:
    """The last release of an `offload` layer that ran on CUDA: its parameters point at the pinned host
    copies again; only a tensor that `changed` (or is new) is copied back from the device."""
    host = host_copies(layer)
    for n, t in _own_tensors(layer).items():
        if t is None or t.device.type == "cpu":
            continue
        if changed or n not in host or host[n].shape != t.shape:
            host[n] = pinned(t.detach().to("cpu"))
        _set_tensor(layer, n, host[n])


@contextlib.contextmanager
def resident(layer: nn.Module, device: torch.device | None = None, write_back: bool | None = False):
    """`with resident(layer):` the layer's weights are real for the block (edits kept with write_back)."""
    bring(layer, device, track_changes=write_back is None)
    try:
        yield layer
    finally:
        release(layer, write_back=write_back)


def _pre_hook(module, args):
    bring(module)


def _post_hook(module, args, out):
    release(module)


_MALLOC_TUNED = False


def _return_freed_memory() -> None:
    """Layers come and go: have glibc serve allocations of 1 MiB and more by mmap, so that a released
    layer's memory goes back to the OS instead of fragmenting the heap of whichever thread freed it."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD (also stops glibc from raising it dynamically)
    except (OSError, AttributeError):
        pass


def _trim() -> None:
    """Hand the heap pages a released layer (and its activations) leave free back to the OS: without
    it glibc keeps them per thread arena and the peak RSS grows with the number of layers
    (measured: ~0.7 of an fp32 layer per layer in capture on CPU)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def attach(model: nn.Module, adapter, mode: str, device: torch.device, files: TensorFiles | None = None) -> None:
    """Give every decoder layer a home (`offload` or `disk`) and the bring / release hooks."""
    prefix = layers_prefix(model, adapter)
    for i, layer in enumerate(adapter.layers(model)):
        if home_of(layer) is None:
            layer.register_forward_pre_hook(_pre_hook)
            layer.register_forward_hook(_post_hook, always_call=True)
        layer._pf_home = Home(mode, torch.device(device), f"{prefix}.{i}.", files)
    model._pf_placement = mode


def placement_of(model: nn.Module) -> str:
    return getattr(model, "_pf_placement", "device")


def layers_prefix(model: nn.Module, adapter) -> str:
    layers = adapter.layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise DataError("model", type(model).__name__, "a model whose decoder layers are a named ModuleList")
