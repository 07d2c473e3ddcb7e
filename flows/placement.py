"""The run's placement (`model.placement`), chosen once, by the flow, before any step runs a model.

Every step of a run, the dense model's evaluation and the pruned one's included, then works under the
same placement: the speed-up and memory ratio a report gives compare models, not placements. It is
chosen after the models a previous run of this process left cached are dropped and the CUDA cache
emptied (the memory they held is free again), against host memory within the container's cgroup
limit, with the largest working set of the run's steps from `pruneflow plan`'s estimates
(`dryrun.memory_plan`). The choice and why go into the report (`placement`).
"""

from __future__ import annotations

import logging

from .spec import RunSpec

log = logging.getLogger("pruneflow.flow")


def run_placement(spec: RunSpec, model: dict, methods: list[tuple[str, dict]] | None = None,
                  ratios: list[float] | None = None, free: tuple[int, int] | None = None) -> dict:
    """{"requested", "placement", "reason", "dtype", "working_set", "free_memory", "host_memory_source",
    "memory"} for the run of `spec` on the loaded `model` (the load step's manifest). `methods`:
    (name, settings) of every method the run prunes with (a sweep's); the largest working set decides."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pruning_core import hfload
    from pruning_core.adapters import adapter_for
    from pruning_core.memory import free_memory, host_available
    from pruning_core.methods import get_method
    from pruning_core.models import resolve_device
    from tasks.common import clear_models

    from .dryrun import memory_plan

    clear_models()  # the models a previous run of this process cached, and the CUDA cache they leave
    dev = resolve_device(spec.device)
    source = host_available()[1]
    free = free or free_memory(dev)
    config = AutoConfig.from_pretrained(model["uri"], trust_remote_code=spec.model.trust_remote_code)
    with torch.device("meta"):
        meta = hfload.from_config(AutoModelForCausalLM, config, trust_remote_code=spec.model.trust_remote_code)
    adapter = adapter_for(meta)
    ratios = ratios or ([spec.ratio] if spec.ratio is not None else [])
    best = None
    for name, settings in methods or [(spec.method.name, spec.method.settings)]:
        meth = get_method(name)
        span = None
        if meth.cosine_span is not None and ratios:
            span = meth.cosine_span(meta, adapter, ratios, meth.parse_settings(settings))
        mem = memory_plan(spec, config, meth, free=free, cosine_span=span, dtype=model["dtype"], check=False)
        if best is None or mem["working_set"] > best["working_set"]:
            best = mem
    log.info("placement %s (%s)", best["placement"], best["placement_reason"])
    return {"requested": spec.model.placement, "placement": best["placement"], "reason": best["placement_reason"],
            "dtype": best["dtype"], "working_set": best["working_set"], "free_memory": best["free_memory"],
            "host_memory_source": source, "memory": best["memory"]}
