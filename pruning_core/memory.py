"""How much memory a model and each step need, how much is free, and the placement that follows
(`pruneflow plan` and `model.placement = auto`).

`auto` is `device` when the model plus the step's working set fit the free device memory, else
`offload` when they fit host memory, else `disk` (`choose_placement` says which and why).

Free host memory is the smaller of what the node has available and what the process's cgroup still
allows (a container's limit: a pod of 32 GiB on a node of 1 TiB has 32 GiB, not 1 TiB), read from
`CGROUP_ROOT` (v2: `memory.max`, `memory.current`; v1: `memory/memory.limit_in_bytes`,
`memory/memory.usage_in_bytes`), with the reclaimable page cache (`inactive_file`) not counted as used.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import hfload
from .errors import ConfigError

PLACEMENTS = ("auto", "device", "offload", "disk")


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


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _stat(path: Path, *keys: str) -> int:
    for line in (_read(path) or "").splitlines():
        k, _, v = line.partition(" ")
        if k in keys and v.strip().isdigit():
            return int(v)
    return 0


def cgroup_available(root: str | Path | None = None) -> int | None:
    """Bytes this cgroup may still allocate (limit - usage + reclaimable page cache), None when it has
    no memory limit or there is no cgroup memory controller at `root` (default `CGROUP_ROOT`)."""
    root = Path(root) if root is not None else CGROUP_ROOT
    if (limit := _read(root / "memory.max")) is not None:  # cgroup v2
        usage, stat, inactive = _read(root / "memory.current"), root / "memory.stat", ("inactive_file",)
    else:  # cgroup v1
        v1 = root / "memory"
        limit, usage, stat = _read(v1 / "memory.limit_in_bytes"), _read(v1 / "memory.usage_in_bytes"), v1 / "memory.stat"
        inactive = ("total_inactive_file", "inactive_file")
    if limit is None or not limit.isdigit():  # "max" (v2): no limit
        return None
    used = int(usage) if usage and usage.isdigit() else 0
    used = max(0, used - _stat(stat, *inactive))
    return max(0, int(limit) - used)


def host_available(cgroup_root: str | Path | None = None) -> tuple[int, str]:
    """(free host bytes, where the figure comes from: "cgroup" or "node")."""
    import psutil

    node = int(psutil.virtual_memory().available)
    cg = cgroup_available(cgroup_root)  # v1 without a limit reports ~2**63: the node's figure wins
    return (cg, "cgroup") if cg is not None and cg < node else (node, "node")


def free_memory(device: torch.device, cgroup_root: str | Path | None = None) -> tuple[int, int]:
    """(free device bytes, free host bytes); host memory within the cgroup's limit (`host_available`).
    On a CPU device the two are the same memory."""
    host, _source = host_available(cgroup_root)
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
    alone. Terms: resident weights (all / non-layer + one layer + the prefetched next one), calibration activations kept between
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
    elif placement == "offload":  # + the next layer, copied in (side stream) while the current one runs
        resident = sizes["other"] + 2 * sizes["layer_max"]
    else:
        resident = sizes["other"] + sizes["layer_max"]
    # disk: the next layer, read into host memory (a read thread) while the current one runs (engine.py)
    host_weights = {"device": 0, "offload": sizes["layers"], "disk": sizes["layer_max"]}[placement]
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
