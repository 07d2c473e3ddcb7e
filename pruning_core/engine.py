"""The layer engine: the one owner of the decoder layers' weights while a pass runs.

A *pass* streams every decoder layer once, in order: the layer is brought (read from its files under
`placement: disk`, copied from its pinned host copy under `offload` on CUDA), the consumers do their
work on it, and it is released — written back (spilled under `disk`, copied to host under
`offload`) only when a consumer says it changed it. While layer i works, layer i+1 is prefetched (disk:
a background read thread; offload on CUDA: a copy on a side stream). When the pass carries
calibration tokens, the hidden states between layers (the *intermediates*) stay in a cache on the
working device, or in host memory (`offload_acts`), and layer i's outputs are layer i+1's inputs.

Consumers are passive objects in the spirit of llm-compressor's modifiers (the pipeline owns the
onloading, the modifiers only observe and compress). Every hook is optional:

=======================  =====================================================================
`begin(step)`            the layer is resident; the consumer may run `step.run(hooks)` itself, change
                         the layer, or set `step.outputs` (what the next layer sees)
`observe(step)`          {submodule path: fn(input, output)} attached to the engine's own forward,
                         the one that computes the layer's outputs (when no consumer set them)
`after(step) -> bool`    the layer is still resident; True when the consumer changed its weights
`finish()`               after the last layer
`wants(i) -> bool`       weights-only passes: layer i is skipped (not read) when no consumer wants it
=======================  =====================================================================

Several consumers can share one pass: they see each layer in list order. Methods never move weights:
capture (`capture.capture_stats`), the scorers (`visit_layers`), SlimGPT, FLAP, LLM-Rank, surgery +
shard writing (`checkpoint.save_streaming`) and perplexity (`metrics.perplexity`, layer-major under
offload / disk) all run through `run_pass`.
`LOADS` (a list, None when off) records every real load as (pass number, layer index): the tests
count them.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter
from .layer_io import LayerStep, _device_of, catch_inputs

LOADS: list[tuple[int, int]] | None = None  # (pass, layer) of every real load, when a list
_PASSES = itertools.count()


@dataclass
class PassResult:
    final_hidden: list[torch.Tensor] | None  # the last layer's outputs (before the final norm)
    n_tokens: int
    changed: list[int]  # indices of the layers a consumer changed


def _home(layer: nn.Module):
    return getattr(layer, "_pf_home", None)


def _combine(hook_sets: list[dict]) -> dict:
    """One hooks dict from several consumers' (each submodule's fns called in consumer order)."""
    merged: dict[str, list] = {}
    for hs in hook_sets:
        for name, fn in (hs or {}).items():
            merged.setdefault(name, []).append(fn)

    def chain(fns):
        if len(fns) == 1:
            return fns[0]
        return lambda x, y: [f(x, y) for f in fns] and None

    return {k: chain(v) for k, v in merged.items()}


class _Residency:
    """Bring / release of the decoder layers for one pass, with a one-layer lookahead.

    Layers without a placement home (`placement: device`) are only moved to the working device when
    they live elsewhere, and moved back after. Layers with a home are held (the placement's hold
    count, so the forward hooks of `placement` only count while the engine holds a layer)."""

    def __init__(self, layers: nn.ModuleList, device: torch.device | None, pass_id: int):
        self.layers, self.device, self.pass_id = layers, device, pass_id
        self.pending: dict[int, tuple[nn.Module, Future | dict]] = {}
        self.pool: ThreadPoolExecutor | None = None
        self.side = None  # CUDA side stream for offload prefetch
        self.moved: dict[int, torch.device] = {}

    def _dev(self, h) -> torch.device:
        return torch.device(self.device) if self.device is not None else h.device

    # -- prefetch ---------------------------------------------------------------------------------
    def prefetch(self, i: int) -> None:
        if i >= len(self.layers) or i in self.pending:
            return
        layer = self.layers[i]
        h = _home(layer)
        if h is None or h.held:
            return
        from .residency import is_resident, read_layer

        if h.mode == "disk":
            if h.files is None or is_resident(layer):
                return
            if self.pool is None:
                self.pool = ThreadPoolExecutor(1, thread_name_prefix="pf-prefetch")
            self.pending[i] = (layer, self.pool.submit(read_layer, layer, h))
        elif h.mode == "offload" and self._dev(h).type == "cuda":
            self.pending[i] = (layer, self._copy_offload(layer, self._dev(h)))

    def _copy_offload(self, layer: nn.Module, dev: torch.device) -> dict:
        from .residency import host_copies

        host = host_copies(layer)
        if self.side is None:
            self.side = torch.cuda.Stream(dev)
        with torch.cuda.stream(self.side):
            out = {n: t.to(dev, non_blocking=True) for n, t in host.items()}
        ev = torch.cuda.Event()
        ev.record(self.side)
        return {"tensors": out, "event": ev}

    # -- bring / release --------------------------------------------------------------------------
    def bring(self, i: int) -> nn.Module:
        from .residency import _layer_lock

        layer = self.layers[i]
        h = _home(layer)
        if h is None:
            home = _device_of(layer)
            if self.device is not None and home != torch.device(self.device):
                layer.to(self.device)
                self.moved[i] = home
            return layer
        got = self.pending.pop(i, (None, None))
        with _layer_lock(layer):
            h.held += 1
            if h.held > 1:
                return layer
            try:
                self._load(layer, h, got[1] if got[0] is layer else None)
            except BaseException:
                h.held -= 1
                raise
        if LOADS is not None:
            LOADS.append((self.pass_id, i))
        return layer

    def _load(self, layer: nn.Module, h, pre) -> None:
        from .residency import _set_tensor, install, is_resident, read_layer

        dev = self._dev(h)
        if h.mode == "offload":
            if dev.type != "cuda":
                layer.to(dev)  # host memory is the device: nothing moves
                return
            if pre is None:
                pre = self._copy_offload(layer, dev)
            torch.cuda.current_stream(dev).wait_event(pre["event"])
            for n, t in pre["tensors"].items():
                t.record_stream(torch.cuda.current_stream(dev))
                _set_tensor(layer, n, t)
            return
        if is_resident(layer):
            return
        install(layer, pre.result() if pre is not None else read_layer(layer, h), dev)

    def release(self, i: int, layer: nn.Module, changed: bool) -> None:
        from .residency import _layer_lock, _trim, release, release_offloaded

        h = _home(layer)
        if h is None:
            if i in self.moved:
                layer.to(self.moved.pop(i))
            return
        if h.mode == "disk":
            release(layer, write_back=changed)
            return
        with _layer_lock(layer):
            h.held = max(0, h.held - 1)
            if h.held:
                return
            if self._dev(h).type != "cuda":
                layer.to("cpu")
                return
            release_offloaded(layer, changed)
        _trim()

    def close(self) -> None:
        for _i, (_layer, fut) in self.pending.items():  # a pass that stopped early: finish the reads
            if isinstance(fut, Future):
                with contextlib.suppress(BaseException):
                    fut.result()
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True)


# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def run_pass(model: nn.Module, adapter: Adapter, consumers: list, input_ids: torch.Tensor | None = None,
             device: torch.device | str | None = None, batch_size: int = 8, offload_acts: bool | None = None,
             keep_final: bool = False, progress: Callable[[int, int], None] | None = None) -> PassResult:
    """Stream every decoder layer once through `consumers` (see the module doc).

    input_ids:   [N, L] token blocks, or None for a weights-only pass (no forwards: scorers, surgery)
    device:      the working device (default: each layer's home device; CPU for unplaced layers)
    offload_acts: keep the intermediates in host memory between layers (None: when the working device
                 is CUDA and a layer's inputs + outputs would take over a quarter of its free memory)
    keep_final:  return the last layer's outputs"""
    layers = adapter.layers(model)
    n = len(layers)
    dev = torch.device(device) if device is not None else None
    pass_id = next(_PASSES)
    inputs: list[torch.Tensor] = []
    kwargs: list[list[dict]] = [[] for _ in range(n)]
    if offload_acts is None:
        offload_acts = input_ids is not None and _acts_too_big(model, input_ids, dev)
    store = torch.device("cpu") if offload_acts else (dev or torch.device("cpu"))
    n_tokens = 0
    if input_ids is not None:
        inputs, kwargs = catch_inputs(model, adapter, input_ids, dev or torch.device("cpu"), batch_size, store)
        n_tokens = int(input_ids.numel())
    res = _Residency(layers, dev, pass_id)
    order = list(range(n))
    if input_ids is None and consumers and all(hasattr(c, "wants") for c in consumers):
        order = [i for i in order if any(c.wants(i) for c in consumers)]  # weights only: skip the unwanted
    changed_layers: list[int] = []
    try:
        if order:
            res.prefetch(order[0])
        for k, i in enumerate(order):
            brought = res.bring(i)
            if k + 1 < len(order):
                res.prefetch(order[k + 1])
            step = LayerStep(i, brought, inputs, kwargs[i], dev or torch.device("cpu"), _store=store)
            changed = False
            try:
                for c in consumers:
                    if hasattr(c, "begin"):
                        c.begin(step)
                step.layer = layers[i]  # a consumer may have replaced it
                if input_ids is not None and step.outputs is None:
                    hooks = _combine([c.observe(step) for c in consumers if hasattr(c, "observe")])
                    step.outputs = step.run(hooks=hooks)
                for c in consumers:
                    if hasattr(c, "after") and c.after(step):
                        changed = True
            finally:
                res.release(i, brought, changed)
            if changed:
                changed_layers.append(i)
            inputs = step.outputs if input_ids is not None else inputs
            if progress:
                progress(i + 1, n)
    finally:
        res.close()
    for c in consumers:
        if hasattr(c, "finish"):
            c.finish()
    return PassResult(inputs if keep_final and input_ids is not None else None, n_tokens, changed_layers)


def _acts_too_big(model: nn.Module, input_ids: torch.Tensor, dev: torch.device | None) -> bool:
    if dev is None or dev.type != "cuda":
        return False
    el = next((p.element_size() for p in model.parameters() if p.is_floating_point()), 4)
    need = 2 * input_ids.numel() * int(model.config.hidden_size) * el  # inputs + outputs of one layer
    free, _total = torch.cuda.mem_get_info(dev)
    return need > free // 4


class _Visit:
    def __init__(self, fn, only_decoders: bool):
        self.fn, self.only_decoders = fn, only_decoders

    def begin(self, step: LayerStep) -> None:
        if self.only_decoders and getattr(step.layer, "pruneflow_kind", "decoder") != "decoder":
            return
        self.fn(step.index, step.layer)


def visit_layers(model: nn.Module, adapter: Adapter, fn: Callable[[int, nn.Module], None],
                 only_decoders: bool = False, read_weights: bool = True) -> None:
    """A read-only weights pass: fn(index, layer) on every (decoder) layer, each resident once
    (`read_weights=False`: shapes only, nothing is brought)."""
    visit = _Visit(fn, only_decoders)
    if not read_weights:
        for i, layer in enumerate(adapter.layers(model)):
            visit.begin(LayerStep(i, layer, [], [], torch.device("cpu")))
        return
    run_pass(model, adapter, [visit])


def keep_resident(module: nn.Module, device: torch.device | str) -> None:
    """Take `module` (a layer a step trains) off its placement home: its weights stay on `device`."""
    from .residency import bring

    if _home(module) is not None:
        bring(module, torch.device(device))
        module._pf_home = None
