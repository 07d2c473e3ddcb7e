"""Save and load pruned checkpoints as plain Hugging Face folders (safetensors, never pickles).

Uniform result (every layer the same shape): the config's sizes are updated and the folder loads
with stock `AutoModelForCausalLM.from_pretrained` (and is servable by vLLM). Non-uniform result:
the config also carries `pruneflow_layers` (one entry per layer: kind, heads, KV heads, FFN size);
`load_pruned(path)` builds the model from the config, reshapes every layer and loads the same
safetensors. Note: transformers 5 has a heterogeneous per-layer config mechanism, but Llama's
modelling code does not read it, so we keep our own list and loader.

`save_streaming` applies a prune plan layer by layer and writes the checkpoint shard by shard
(safetensors + the index file Hugging Face writes), so that saving never needs the whole model in
memory either (a model opened under `offload` / `disk`, see `pruning_core.residency`).

Writes are atomic: everything goes to a temporary sibling folder which is renamed into place.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError
from .plan import PrunePlan
from .residency import _own_tensors, home_of, layers_prefix, placement_of, resident, to_meta
from .surgery import sync_config
from .util import recover_dir, replace_dir, staged_dir
from .weightfiles import ShardWriter


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
    """(model, tokenizer) from any checkpoint written by `save_pruned` / `save_streaming` or
    stock HF, one call: a local folder, a hub id (the Hugging Face cache when offline) or an s3://
    folder. The model is built on the meta device and only then filled from the safetensors (no
    full-size random initialisation, uniform or not). `dtype` None: "auto" (fp32 on CPU, the
    checkpoint's dtype on CUDA). `placement`: device, offload or disk (see `pruning_core.residency`)."""
    from .loading import open_model
    from .models import resolve_source

    device = torch.device(device) if not isinstance(device, torch.device) else device
    p = Path(str(path)).expanduser()
    if not p.exists():
        recover_dir(p)  # a writer killed between replace_dir's renames
    local = str(p) if p.exists() else resolve_source(str(path), revision)[0]
    return open_model(local, placement=placement, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


def save_streaming(model: nn.Module, tokenizer, plan, path: str | Path, shard_bytes: int = 2 * 2**30,
                   apply: bool = True) -> Path:
    """Apply `plan` (or none) layer by layer and write the result to `path` (atomic), shard by shard.
    `apply=False`: the model is already pruned; the plan is only recorded (plan.json).

    Each kept decoder layer is brought (read / moved), pruned, written and released, so memory holds
    one layer at a time under `offload` / `disk`; under `disk` every layer is its own shard. After the
    call `model` describes the pruned shapes (under `disk` its layers hold no data any more)."""
    from .adapters import adapter_for
    from .surgery import set_layers, sync_config

    path = Path(path).expanduser()
    adapter = adapter_for(model)
    layers = list(adapter.layers(model))
    if plan is not None and apply and len(plan.layers) != len(layers):
        raise ConfigError("plan.layers", len(plan.layers), f"one entry per decoder layer ({len(layers)})")
    prefix = layers_prefix(model, adapter)
    mode = placement_of(model)
    with staged_dir(path) as tmp:
        writer = ShardWriter(tmp, 0 if mode == "disk" else shard_bytes)
        shards = _ShardConsumer(model, adapter, plan if apply else None, writer, prefix, mode)
        from .engine import run_pass

        run_pass(model, adapter, [shards])  # weights only; a layer the plan removes is not read
        kept = shards.kept
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


class _ShardConsumer:
    """The surgery + shard writing of `save_streaming` as a consumer of one weights pass of the layer
    engine: each kept layer is pruned (or replaced) while resident and written; the written shard is
    its write-back, so the engine spills nothing. A replacement built from a block of layers
    (`collapse`, `ffn`) holds the block's other layers — removed ones the pass skips — while it is built."""

    def __init__(self, model, adapter, plan, writer: ShardWriter, prefix: str, mode: str):
        self.model, self.adapter, self.plan, self.writer = model, adapter, plan, writer
        self.prefix, self.mode = prefix, mode
        self.layers = list(adapter.layers(model))
        self.kept: list[nn.Module] = []

    def _lp(self, i: int):
        return self.plan.layers[i] if self.plan is not None else None

    def wants(self, i: int) -> bool:
        lp = self._lp(i)
        return lp is None or lp.keep

    def begin(self, step) -> None:
        from .surgery import apply_layer_plan

        layer, lp = step.layer, self._lp(step.index)
        span = []
        if lp is not None and lp.replacement and lp.replacement.get("kind") not in (None, "layer") \
                and "span" in lp.replacement:
            a, b = (int(x) for x in lp.replacement["span"])
            span = [self.layers[j] for j in range(a, b) if self.layers[j] is not layer]
        with contextlib.ExitStack() as stack:
            for other in span:
                stack.enter_context(resident(other))
            new = apply_layer_plan(self.model, self.adapter, layer, lp) if lp is not None else layer
        self.writer.add({f"{self.prefix}.{len(self.kept)}.{k}": v for k, v in _own_tensors(new).items()
                         if v is not None})
        if self.mode == "disk":
            self.writer.flush()
        if new is not layer:
            if self.mode == "disk":
                to_meta(new)
            elif self.mode == "offload":
                new.to("cpu")
            if home_of(new) is not None:
                new._pf_home = None
        elif home_of(layer) is not None and self.mode == "disk":
            layer._pf_home.files = None  # the file no longer matches the pruned shapes (released to meta)
        self.kept.append(new)

    def after(self, step) -> bool:
        return False  # the shard is the write-back


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
