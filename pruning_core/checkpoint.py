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

from pathlib import Path

import torch
from torch import nn

from .placement import _load_tokenizer, finish_checkpoint  # noqa: F401 - re-exported
from .plan import PrunePlan
from .surgery import sync_config
from .util import recover_dir, staged_dir


def save_pruned(model: nn.Module, tokenizer, plan: PrunePlan | None, path: str | Path) -> Path:
    """Write model (+ tokenizer, plan.json) to `path` atomically. Returns the path."""
    path = Path(path).expanduser()
    with staged_dir(path) as tmp:
        stock = sync_config(model)
        if getattr(model.config, "architectures", None) is None:
            model.config.architectures = [type(model).__name__]
        model.save_pretrained(tmp, safe_serialization=True)
        finish_checkpoint(model, tokenizer, plan, stock, tmp, path)
    return path


def is_uniform(path: str | Path) -> bool:
    import json

    cfg = json.loads((Path(path) / "config.json").read_text())
    return "pruneflow_layers" not in cfg


def load_pruned(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None,
                trust_remote_code: bool = False, placement: str = "device", revision: str | None = None):
    """(model, tokenizer) from any checkpoint written by `save_pruned` / `placement.save_streaming` or
    stock HF, one call: a local folder, a hub id (the Hugging Face cache when offline) or an s3://
    folder. The model is built on the meta device and only then filled from the safetensors (no
    full-size random initialisation, uniform or not). `dtype` None: "auto" (fp32 on CPU, the
    checkpoint's dtype on CUDA). `placement`: device, offload or disk (see `pruning_core.placement`)."""
    from .models import resolve_source
    from .placement import open_model

    device = torch.device(device) if not isinstance(device, torch.device) else device
    p = Path(str(path)).expanduser()
    if not p.exists():
        recover_dir(p)  # a writer killed between replace_dir's renames
    local = str(p) if p.exists() else resolve_source(str(path), revision)[0]
    return open_model(local, placement=placement, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
