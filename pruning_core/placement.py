"""Where the weights live while a step runs: `model.placement = auto | device | offload | disk`.

* `device`  — the whole model on the working device.
* `offload` — everything but the decoder layers on the device; each decoder layer lives in host
  memory and is moved to the device only while it runs.
* `disk`    — everything but the decoder layers on the device; a decoder layer's parameters stay in
  the checkpoint's safetensors files (the module holds `meta` tensors of the right shapes) and are
  read when the layer runs and dropped after. A layer a method modifies is spilled to a scratch
  safetensors file when it is released, and read back from there. Spills live in a folder
  `pruneflow-spill-<pid>.<host digest>-*` in `$PRUNEFLOW_SCRATCH` (else `$TMPDIR`), removed when the
  model goes; the tag in its name lets a cleaner tell a killed process's spill from a live one's.
* `auto`    — `device` when the model plus the step's working set fit the free device memory, else
  `offload` when they fit host memory, else `disk` (`choose_placement` says which and why).

The mechanics are one small state object per decoder layer (`layer._pf_home`) and two hooks: a
forward pre-hook brings the layer (reads / moves it) and a forward hook releases it, with a hold
count so that a consumer that runs a layer many times (`capture.LayerStream`) brings it once. So
every forward of the model — perplexity, lm-eval's HFLM, Streamline's teacher — works unchanged
under every placement, and the same numbers come out (`tests/pruning_core/test_placement.py`).

`open_model` builds a model from its config with parameters on the `meta` device (no full-size
initialisation, uniform or not), reads only what the placement keeps resident, and attaches the
homes. `save_streaming` applies a prune plan layer by layer and writes the checkpoint shard by
shard (safetensors + the index file Hugging Face writes), so that saving never needs the whole
model in memory either.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import hfload
from .errors import ConfigError, DataError
from .util import replace_dir, staged_dir

PLACEMENTS = ("auto", "device", "offload", "disk")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _load_tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


# ------------------------------------------------------------------------------------------------
# tensors in a checkpoint folder


class TensorFiles:
    """The named tensors of a checkpoint folder (one file, or shards + index), read one at a time."""

    def __init__(self, folder: str | Path, prefix_alias: str = ""):
        self.folder = Path(folder)
        self.where: dict[str, Path] = {}
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            wm = json.loads(index.read_text())["weight_map"]
            self.where = {k: self.folder / v for k, v in wm.items()}
        else:
            from safetensors import safe_open

            for f in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as fh:
                    for k in fh.keys():
                        self.where[k] = f
        if not self.where:
            raise DataError("model", str(folder), "a checkpoint folder with safetensors weights")
        # stock checkpoints of some families omit the base-model prefix (OPT: "decoder.…")
        self.alias = prefix_alias
        self.spill_dir: Path | None = None

    def key(self, name: str) -> str | None:
        if name in self.where:
            return name
        if self.alias and name.startswith(self.alias + ".") and name[len(self.alias) + 1 :] in self.where:
            return name[len(self.alias) + 1 :]
        return None

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """{name: tensor} (CPU, the file's dtype), grouped by file so each file is opened once."""
        from safetensors import safe_open

        by_file: dict[Path, list[tuple[str, str]]] = {}
        for n in names:
            k = self.key(n)
            if k is None:
                raise DataError("model", str(self.folder), "a checkpoint whose tensors match its config", f"missing {n}")
            by_file.setdefault(self.where[k], []).append((n, k))
        out = {}
        for f, items in by_file.items():
            with safe_open(str(f), framework="pt") as fh:
                for n, k in items:
                    out[n] = fh.get_tensor(k)
        return out

    def spill(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write modified tensors to a scratch file; later reads of those names come from it."""
        from safetensors.torch import save_file

        if self.spill_dir is None:
            base = os.environ.get("PRUNEFLOW_SCRATCH") or None
            self.spill_dir = Path(tempfile.mkdtemp(prefix=f"pruneflow-spill-{owner_tag()}-", dir=base))
            weakref.finalize(self, shutil.rmtree, str(self.spill_dir), True)
        f = self.spill_dir / f"spill-{len(list(self.spill_dir.iterdir())):05d}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(f))
        for k in tensors:
            self.where[k] = f


def owner_tag() -> str:
    """`<pid>.<host digest>`: the owner tag of a spill's name, the one `tasks.journal.owner_tag` gives."""
    import socket

    return f"{os.getpid()}.{hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]}"


# ------------------------------------------------------------------------------------------------
# one decoder layer's home


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
        if h.files is None:
            raise DataError("model.placement", "disk", "a layer still backed by its checkpoint files")
        own = {n: t for n, t in _own_tensors(layer).items() if t is not None}
        missing = [n for n, t in own.items() if t.device.type == "meta"]
        # a tensor a method added to a layer that was not resident (FLAP's zero biases) is not in the
        # files yet: it starts as zeros, as it would have on the device
        new = [n for n in missing if h.files.key(h.prefix + n) is None]
        got = h.files.read([h.prefix + n for n in missing if n not in new])
        for n in missing:
            t = torch.zeros(own[n].shape) if n in new else got[h.prefix + n]
            _set_tensor(layer, n, t.to(device=dev, dtype=own[n].dtype))
        del got
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


@contextlib.contextmanager
def resident(layer: nn.Module, device: torch.device | None = None, write_back: bool | None = False):
    """`with resident(layer):` the layer's weights are real for the block (edits kept with write_back)."""
    bring(layer, device, track_changes=write_back is None)
    try:
        yield layer
    finally:
        release(layer, write_back=write_back)


def resident_layers(model: nn.Module, adapter, write_back: bool | None = False):
    """Iterate (index, layer) with each layer resident only during its iteration."""
    for i, layer in enumerate(adapter.layers(model)):
        with resident(layer, write_back=write_back):
            yield i, layer


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


# ------------------------------------------------------------------------------------------------
# loading


_EMPTY_INIT = threading.local()


@contextlib.contextmanager
def empty_init():
    """Modules built inside get `meta` parameters (buffers stay real: rotary tables etc.). It swaps a
    class attribute of nn.Module, which every thread sees: the swapped method acts only in the thread
    that entered (a Dask / Prefect thread building a pruned layer meanwhile gets real parameters), and
    `hfload.BUILD_LOCK` is held around it so that two threads never swap at once."""
    orig = nn.Module.register_parameter

    def register(self, name, param):
        orig(self, name, param)
        if not getattr(_EMPTY_INIT, "on", False):
            return
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    _EMPTY_INIT.on = True
    try:
        yield
    finally:
        _EMPTY_INIT.on = False
        nn.Module.register_parameter = orig


def checkpoint_dtype(config) -> torch.dtype | None:
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, torch.dtype):
        return d
    if isinstance(d, str) and hasattr(torch, d) and isinstance(getattr(torch, d), torch.dtype):
        return getattr(torch, d)
    return None


def resolve_dtype(spec, config, device: torch.device) -> torch.dtype:
    """`model.dtype`: auto = the checkpoint's own dtype on CUDA, fp32 elsewhere."""
    if spec in (None, "auto"):
        if torch.device(device).type == "cuda":
            return checkpoint_dtype(config) or torch.float32
        return torch.float32
    if isinstance(spec, torch.dtype):
        return spec
    if spec not in DTYPES:
        raise ConfigError("model.dtype", spec, "auto, float32, bfloat16 or float16")
    return DTYPES[spec]


def open_model(path: str | Path, placement: str = "device", device: str | torch.device = "cpu",
               dtype=None, trust_remote_code: bool = False, with_tokenizer: bool = True,
               only_layers: list[int] | None = None):
    """(model, tokenizer) of a checkpoint folder under `placement` (device | offload | disk; resolve
    `auto` first with `choose_placement`). Parameters start on `meta`; only what the placement keeps
    resident is read. Non-uniform checkpoints (per-layer sizes in the config) take the same path.
    `only_layers`: read just these decoder layers (on `device`); every other tensor stays on `meta` —
    a block of a model, e.g. the dense layers LLM-Streamline's replacement learns to stand for."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .adapters import adapter_for
    from .replacements import layer_kind

    if placement not in ("device", "offload", "disk"):
        raise ConfigError("model.placement", placement, "device, offload or disk (auto is resolved first)")
    device = torch.device(device)
    p = Path(str(path)).expanduser()
    if not (p / "config.json").exists():
        raise DataError("model", str(p), "a folder with config.json (a Hugging Face checkpoint)")
    config = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
    dt = resolve_dtype(dtype, config, device)
    with hfload.BUILD_LOCK, empty_init():  # one model build at a time per process (see hfload)
        model = hfload.from_config(AutoModelForCausalLM, config, dtype=dt, trust_remote_code=trust_remote_code)
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    for i, desc in enumerate(getattr(config, "pruneflow_layers", None) or []):
        if desc["kind"] == "decoder":
            shape = adapter.layer_shape(model, layers[i])
            if desc["n_heads"] != shape.n_heads or desc["n_kv_heads"] != shape.n_kv_heads:
                rep_new = desc["n_heads"] // desc["n_kv_heads"]
                keep_q = [g * (shape.n_heads // shape.n_kv_heads) + j for g in range(desc["n_kv_heads"])
                          for j in range(rep_new)]
                adapter.prune_heads(model, layers[i], keep_q, list(range(desc["n_kv_heads"])))
            if desc["ffn"] != shape.ffn:
                adapter.prune_ffn(layers[i], list(range(desc["ffn"])))
            with hfload.BUILD_LOCK, empty_init():
                adapter.add_bias(layers[i], desc.get("bias", ()))  # biases the architecture hard-codes away
        else:
            with hfload.BUILD_LOCK, empty_init():
                layers[i] = layer_kind(desc["kind"]).empty(config, desc).to(dtype=dt)
    adapter.renumber(model)

    files = TensorFiles(p, getattr(model, "base_model_prefix", ""))
    prefix = layers_prefix(model, adapter) + "."
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = {n: t for n, t in _own_tensors(model).items() if t is not None}
    unknown = [k for k in files.where if all(files.key(n) != k for n in names)]
    if unknown:
        raise DataError("model", str(p), "a checkpoint whose tensors match its config", f"unexpected {unknown[:3]}")
    in_layers = {n for n in names if n.startswith(prefix)}
    want = [n for n in names if (placement != "disk" or n not in in_layers) and names[n].device.type == "meta"]
    if only_layers is not None:
        if placement != "device":
            raise ConfigError("model.placement", placement, "device when reading only some layers")
        block = tuple(f"{prefix}{j}." for j in only_layers)
        want = [n for n in want if n.startswith(block)]
    skip = {n for n in want if files.key(n) is None and tied and n.endswith("lm_head.weight")}
    missing = [n for n in want if files.key(n) is None and n not in skip]
    if missing:
        raise DataError("model", str(p), "a checkpoint whose tensors match its config", f"missing {missing[:3]}")
    for n in want:
        if n in skip:
            continue
        t = files.read([n])[n]
        dev = torch.device("cpu") if (placement == "offload" and n in in_layers) else device
        _set_tensor(model, n, t.to(device=dev, dtype=names[n].dtype))
        del t
    if tied and only_layers is None:
        model.tie_weights()
    for n, b in model.named_buffers():  # non-persistent buffers (rotary tables) follow the device
        if n.startswith(prefix) and placement != "device":
            continue
        if b.device != device:
            _set_tensor(model, n, b.to(device))
    if placement != "device":
        _return_freed_memory()
        attach(model, adapter, placement, device, files if placement == "disk" else None)
    model.eval()
    tok = _load_tokenizer(p, trust_remote_code) if with_tokenizer else None
    return model, tok


# ------------------------------------------------------------------------------------------------
# choosing a placement


def param_bytes(config, dtype: torch.dtype) -> dict:
    """{"total", "layers", "layer_max", "other"} bytes of `config`'s model in `dtype` (from a meta build)."""
    from transformers import AutoModelForCausalLM

    from .adapters import adapter_for

    with torch.device("meta"):
        model = hfload.from_config(AutoModelForCausalLM, config, dtype=dtype)
    adapter = adapter_for(model)
    size = torch.tensor([], dtype=dtype).element_size()
    per = [sum(p.numel() for p in layer.parameters()) * size for layer in adapter.layers(model)]
    seen, total = set(), 0
    for prm in model.parameters():
        if id(prm) not in seen:
            seen.add(id(prm))
            total += prm.numel() * size
    return {"total": total, "layers": sum(per), "layer_max": max(per) if per else 0, "other": total - sum(per)}


def free_memory(device: torch.device) -> tuple[int, int]:
    """(free device bytes, free host bytes)."""
    import psutil

    host = int(psutil.virtual_memory().available)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), host
    return host, host


def choose_placement(requested: str, sizes: dict, working_set: int, device: torch.device,
                     free: tuple[int, int] | None = None, headroom: float = 0.9) -> tuple[str, str]:
    """(placement, reason). `auto`: device if model + working set fit the free device memory, else
    offload if the decoder layers fit host memory (and the rest + one layer + working set the
    device), else disk."""
    if requested not in PLACEMENTS:
        raise ConfigError("model.placement", requested, ", ".join(PLACEMENTS))
    if requested != "auto":
        return requested, "requested"
    dev_free, host_free = free or free_memory(device)
    gib = 2**30
    need_dev = sizes["total"] + working_set
    if device.type != "cuda":  # host memory is the device
        if need_dev <= headroom * host_free:
            return "device", f"model {sizes['total'] / gib:.2f} GiB + working set {working_set / gib:.2f} GiB fit free memory {host_free / gib:.2f} GiB"
        return "disk", f"model {sizes['total'] / gib:.2f} GiB + working set {working_set / gib:.2f} GiB exceed free memory {host_free / gib:.2f} GiB"
    if need_dev <= headroom * dev_free:
        return "device", f"model + working set {need_dev / gib:.2f} GiB fit free device memory {dev_free / gib:.2f} GiB"
    # offload and disk both keep on the device everything but the decoder layers, one layer at a time
    # and the working set
    need_layerwise = sizes["other"] + sizes["layer_max"] + working_set
    if need_layerwise > headroom * dev_free:
        return "disk", (f"model + working set {need_dev / gib:.2f} GiB, and even the rest + one layer + working "
                        f"set {need_layerwise / gib:.2f} GiB, exceed free device memory {dev_free / gib:.2f} GiB "
                        "(the memory check refuses it)")
    if sizes["layers"] <= headroom * host_free:
        return "offload", (f"model + working set {need_dev / gib:.2f} GiB exceed free device memory "
                           f"{dev_free / gib:.2f} GiB; layers {sizes['layers'] / gib:.2f} GiB fit host memory")
    return "disk", (f"model {sizes['total'] / gib:.2f} GiB exceeds free device ({dev_free / gib:.2f} GiB) and "
                    f"host ({host_free / gib:.2f} GiB) memory")


# ------------------------------------------------------------------------------------------------
# streaming save


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """A safetensors file written straight from the tensors' memory (safetensors' own `save_file`
    first serialises the whole shard into one bytes object: a second copy of it in memory).
    Format: u64 little-endian header length, JSON header {name: dtype, shape, data_offsets}, data."""
    header: dict = {"__metadata__": dict(metadata or {})}
    off = 0
    items = sorted(tensors.items())
    for k, t in items:
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as fh:
        fh.write(len(hb).to_bytes(8, "little"))
        fh.write(hb)
        for _k, t in items:
            if t.numel():
                fh.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


class ShardWriter:
    """Accumulate tensors and write them as safetensors shards of at most ~`shard_bytes`."""

    def __init__(self, folder: Path, shard_bytes: int):
        self.folder, self.shard_bytes = folder, max(1, int(shard_bytes))
        self.buf: dict[str, torch.Tensor] = {}
        self.buf_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.buf[k] = v.detach().to("cpu").contiguous()
            n = v.numel() * v.element_size()
            self.buf_bytes += n
            self.total += n
        if self.buf_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        f = self.folder / f".shard-{len(self.files):05d}.safetensors"
        write_safetensors(f, self.buf, metadata={"format": "pt"})
        self.files.append((f, list(self.buf)))
        self.buf, self.buf_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.files) == 1:
            os.replace(self.files[0][0], self.folder / "model.safetensors")
            return
        n = len(self.files)
        wm = {}
        for j, (f, keys) in enumerate(self.files):
            name = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
            os.replace(f, self.folder / name)
            wm.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(wm.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_streaming(model: nn.Module, tokenizer, plan, path: str | Path, shard_bytes: int = 2 * 2**30,
                   apply: bool = True) -> Path:
    """Apply `plan` (or none) layer by layer and write the result to `path` (atomic), shard by shard.
    `apply=False`: the model is already pruned; the plan is only recorded (plan.json).

    Each kept decoder layer is brought (read / moved), pruned, written and released, so memory holds
    one layer at a time under `offload` / `disk`; under `disk` every layer is its own shard. After the
    call `model` describes the pruned shapes (under `disk` its layers hold no data any more)."""
    from .adapters import adapter_for
    from .surgery import apply_layer_plan, set_layers, sync_config

    path = Path(path).expanduser()
    adapter = adapter_for(model)
    layers = list(adapter.layers(model))
    if plan is not None and apply and len(plan.layers) != len(layers):
        raise ConfigError("plan.layers", len(plan.layers), f"one entry per decoder layer ({len(layers)})")
    prefix = layers_prefix(model, adapter)
    mode = placement_of(model)
    with staged_dir(path) as tmp:
        writer = ShardWriter(tmp, 0 if mode == "disk" else shard_bytes)
        kept: list[nn.Module] = []
        for i, layer in enumerate(layers):
            lp = plan.layers[i] if plan is not None and apply else None
            if lp is not None and not lp.keep:
                continue
            span = []
            if lp is not None and lp.replacement and "span" in lp.replacement:
                a, b = (int(x) for x in lp.replacement["span"])
                span = [layers[j] for j in range(a, b) if layers[j] is not layer]
            with contextlib.ExitStack() as stack:
                for other in span:
                    stack.enter_context(resident(other))
                bring(layer)
                new = apply_layer_plan(model, adapter, layer, lp) if lp is not None else layer
                writer.add({f"{prefix}.{len(kept)}.{k}": v for k, v in _own_tensors(new).items() if v is not None})
                if mode == "disk":
                    writer.flush()
                if new is not layer:
                    release(layer)
                    if mode == "disk":
                        to_meta(new)
                    elif mode == "offload":
                        new.to("cpu")
                else:
                    release(layer)
                    if home_of(layer) is not None and mode == "disk":
                        layer._pf_home.files = None  # the file no longer matches the pruned shapes
                if home_of(new) is not None and new is not layer:
                    new._pf_home = None
            kept.append(new)
        if not kept:
            raise ConfigError("plan.layers", "all removed", "a plan that keeps at least one layer")
        set_layers(model, adapter, kept)
        stock = sync_config(model)
        if getattr(model.config, "architectures", None) is None:
            model.config.architectures = [type(model).__name__]
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        rest = {}
        for k, v in _own_tensors(model).items():
            if v is None or k.startswith(prefix + "."):
                continue
            if tied and k.endswith("lm_head.weight"):
                continue
            rest[k] = v
        writer.add(rest)
        writer.close()
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except (ValueError, OSError):
                pass
        finish_checkpoint(model, tokenizer, plan, stock, tmp, path)
    return path


def finish_checkpoint(model, tokenizer, plan, stock: bool, tmp: Path, path: Path) -> None:
    """The tail every checkpoint writer shares: the stock config with settled biases (e.g. Qwen2 + FLAP's
    biases saved as Llama), tokenizer, plan.json, then `tmp` put in place of `path`."""
    from .surgery import settle_biases

    config = settle_biases(model) if stock else None
    if config is not None and config is not model.config:
        config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if plan is not None:
        plan.save(tmp / "plan.json")
    replace_dir(tmp, path)


# ------------------------------------------------------------------------------------------------
# memory estimates (`pruneflow plan`)

PROCESS_BASE = 900 * 2**20  # python + torch + transformers + prefect in one process (measured on CPU)


def stats_bytes(config, method) -> int:
    """Bytes of the capture statistics `method` asks for (fp32): norm vectors, Gram matrices."""
    h = int(config.hidden_size)
    ffn = int(getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", 4 * h))
    n_layers = int(config.num_hidden_layers)
    needs = set(getattr(method, "needs", ()) or ())
    return n_layers * ((4 * h + 3 * ffn) + h * h * ("attn_gram" in needs) + ffn * ffn * ("mlp_gram" in needs)) * 4


def estimate_steps(config, dtype: torch.dtype, placement: str, device: torch.device, method,
                   n_samples: int, seq_len: int, batch_size: int, eval_seq_len: int, eval_batch: int,
                   cosine_span: int | None = None) -> dict[str, dict]:
    """Estimated peak {"device", "host"} bytes of each model step under `placement`, from the config
    alone. Terms: resident weights (all / non-layer + one layer), calibration activations kept between
    layers, one batch's working set inside a layer, the method's statistics, evaluation logits.
    On a CPU device, device and host are the same memory: `device` is then 0 and `host` the sum."""
    sizes = param_bytes(config, dtype)
    el = torch.tensor([], dtype=dtype).element_size()
    h = int(config.hidden_size)
    ffn = int(getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", 4 * h))
    n_layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    vocab = int(config.vocab_size)
    tokens = n_samples * seq_len
    acts = 2 * tokens * h * el  # inputs + outputs of the current layer, every calibration block
    bt = min(batch_size, n_samples) * seq_len
    work = bt * (3 * ffn + 4 * h) * 4 + min(batch_size, n_samples) * heads * seq_len * seq_len * 4
    needs = set(getattr(method, "needs", ()) or ())
    stats = stats_bytes(config, method)
    cos_host = 0
    if "cosine" in needs or getattr(method, "name", "") in ("llm-streamline", "shortgpt"):
        span = n_layers if cosine_span is None else cosine_span
        cos_host = (span + 1) * tokens * h * 4
    coupled = bool(getattr(method, "coupled", False))
    per_layer = 0
    if coupled:
        name = getattr(method, "name", "")
        if name == "slimgpt":
            per_layer = (h * h + ffn * ffn) * 8 * 2 + 2 * h * max(h, ffn) * 8  # Hessians + W copies (fp64)
        elif name == "flap":
            per_layer = (h + ffn) * 8 * 4
        elif name == "llm-streamline":
            per_layer = 4 * sizes["layer_max"] // el * 4 + 2 * tokens * h * 4  # fp32 master, grad, Adam + pairs
    if placement == "device":
        resident = sizes["total"]
    else:
        resident = sizes["other"] + sizes["layer_max"]
    host_weights = {"device": 0, "offload": sizes["layers"], "disk": 0}[placement]
    logits = eval_batch * eval_seq_len * vocab * 4 * 2
    on_dev = {
        "capture": resident + acts + work + stats,
        "score": resident + stats,
        "prune": resident + acts + work + per_layer + sizes["layer_max"],  # + the layer being written
        "evaluate": resident + eval_batch * eval_seq_len * (3 * ffn + 4 * h) * 4 + logits,
    }
    host = {k: PROCESS_BASE + host_weights for k in on_dev}
    host["capture"] += cos_host
    host["prune"] += sizes["layer_max"] + (cos_host if coupled else 0)  # a shard's bytes while it is written
    if device.type != "cuda":
        return {k: {"device": 0, "host": host[k] + on_dev[k]} for k in on_dev}
    return {k: {"device": on_dev[k], "host": host[k]} for k in on_dev}


def check_fits(estimates: dict[str, dict], free: tuple[int, int], placement: str, headroom: float = 0.9,
               cuda: bool = False) -> None:
    """A one-line ConfigError naming the first step that cannot fit the free memory."""
    dev_free, host_free = free
    gib = 2**30
    for step, e in estimates.items():
        for where, need, have in (("device", e["device"], dev_free), ("host", e["host"], host_free)):
            if need and need > headroom * have:
                other = {"device": "offload or disk" if cuda else "disk", "offload": "disk",
                         "disk": "fewer calibration samples or a smaller batch"}[placement]
                raise ConfigError("model.placement", placement,
                                  f"a placement whose steps fit: step {step} needs ~{need / gib:.1f} GiB of {where} "
                                  f"memory, {have / gib:.1f} GiB free (try {other})")
