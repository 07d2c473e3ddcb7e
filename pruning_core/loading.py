"""Opening a checkpoint folder under a placement: the model is built from its config with parameters
on the `meta` device (no full-size initialisation, uniform or not), only what the placement keeps
resident is read, and the decoder layers get their homes (`residency.attach`). Also the dtype policy
(`model.dtype`) and the tokenizer beside the weights.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import torch
from torch import nn

from . import hfload
from .errors import ConfigError, DataError
from .residency import _own_tensors, _return_freed_memory, _set_tensor, attach, layers_prefix
from .weightfiles import TensorFiles

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def _load_tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


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


def resolve_dtype(spec, config=None, device: str | torch.device = "cpu") -> torch.dtype:
    """The torch dtype of `model.dtype` (the one function that reads it): a name (float32 / fp32,
    bfloat16 / bf16, float16 / fp16) or a torch dtype as given; None or "auto": the checkpoint's own
    dtype (`config`) on CUDA, fp32 elsewhere (and fp32 when no config is given)."""
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
                adapter.prune_ffn(layers[i], list(range(desc["ffn"])), allow_empty=True)
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
