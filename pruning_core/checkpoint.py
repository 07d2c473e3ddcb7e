"""Save and load pruned checkpoints as plain Hugging Face folders (safetensors, never pickles).

Uniform result (every layer the same shape): the config's sizes are updated and the folder loads
with stock `AutoModelForCausalLM.from_pretrained` (and is servable by vLLM). Non-uniform result:
the config also carries `pruneflow_layers` (one entry per layer: kind, heads, KV heads, FFN size);
`load_pruned(path)` builds the model from the config, reshapes every layer and loads the same
safetensors. Note: transformers 5 has a heterogeneous per-layer config mechanism, but Llama's
modelling code does not read it, so we keep our own list and loader.

Writes are atomic: everything goes to a temporary sibling folder which is renamed into place.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from . import hfload
from .adapters import adapter_for
from .errors import DataError, StorageError
from .plan import PrunePlan
from .replacements import layer_kind
from .surgery import settle_biases, sync_config
from .util import replace_dir


def _check_writable(path: Path) -> None:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError("output", str(path), "a folder whose parent can be created and written", str(e)) from None
    if not os.access(parent, os.W_OK):
        raise StorageError("output", str(path), "a writable folder")


def save_pruned(model: nn.Module, tokenizer, plan: PrunePlan | None, path: str | Path) -> Path:
    """Write model (+ tokenizer, plan.json) to `path` atomically. Returns the path."""
    path = Path(path).expanduser()
    _check_writable(path)
    stock = sync_config(model)
    if getattr(model.config, "architectures", None) is None:
        model.config.architectures = [type(model).__name__]
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        config = settle_biases(model) if stock else None
        if config is not None and config is not model.config:  # e.g. Qwen2 + FLAP's biases, saved as Llama
            config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            plan.save(tmp / "plan.json")
        replace_dir(tmp, path)
    except OSError as e:
        raise StorageError("output", str(path), "a writable folder", str(e)) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def is_uniform(path: str | Path) -> bool:
    import json

    cfg = json.loads((Path(path) / "config.json").read_text())
    return "pruneflow_layers" not in cfg


def _load_tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def load_pruned(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                trust_remote_code: bool = False):
    """(model, tokenizer) from any checkpoint folder written by `save_pruned` or stock HF, one call."""
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(device) if not isinstance(device, torch.device) else device
    p = Path(str(path)).expanduser()
    if not p.exists():  # a hub id: stock loader only
        model = hfload.from_pretrained(AutoModelForCausalLM, str(path), dtype=dtype, trust_remote_code=trust_remote_code)
        from transformers import AutoTokenizer

        return model.to(device).eval(), AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if not (p / "config.json").exists():
        raise DataError("model", str(p), "a folder with config.json (a Hugging Face checkpoint)")
    config = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
    layers_desc = getattr(config, "pruneflow_layers", None)
    if not layers_desc:
        model = hfload.from_pretrained(AutoModelForCausalLM, p, dtype=dtype, trust_remote_code=trust_remote_code)
        return model.to(device).eval(), _load_tokenizer(p, trust_remote_code)

    model = hfload.from_config(AutoModelForCausalLM, config, dtype=dtype or torch.float32)
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    for i, desc in enumerate(layers_desc):
        if desc["kind"] == "decoder":
            shape = adapter.layer_shape(model, layers[i])
            if desc["n_heads"] != shape.n_heads or desc["n_kv_heads"] != shape.n_kv_heads:
                rep_new = desc["n_heads"] // desc["n_kv_heads"]
                rep = shape.n_heads // shape.n_kv_heads
                keep_q = [g * rep + j for g in range(desc["n_kv_heads"]) for j in range(rep_new)]
                adapter.prune_heads(model, layers[i], keep_q, list(range(desc["n_kv_heads"])))
            if desc["ffn"] != shape.ffn:
                adapter.prune_ffn(layers[i], list(range(desc["ffn"])))
            adapter.add_bias(layers[i], desc.get("bias", ()))  # biases the architecture hard-codes away
        else:
            layers[i] = layer_kind(desc["kind"]).empty(config, desc)
    adapter.renumber(model)
    from safetensors.torch import load_file

    state = {}
    for f in sorted(glob.glob(str(p / "*.safetensors"))):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    bad_missing = [k for k in missing if k not in tied]
    if bad_missing or unexpected:
        raise DataError("model", str(p), "a checkpoint whose tensors match its config",
                        f"missing {bad_missing[:3]}, unexpected {list(unexpected)[:3]}")
    if tied:
        model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval(), _load_tokenizer(p, trust_remote_code)
