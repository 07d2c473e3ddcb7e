"""Efficiency of a (pruned) model, measured the same way for dense and pruned in one process.

`measure(model)` returns parameters, forward FLOPs per token, prefill latency, greedy-decode
throughput and peak memory:

* **prefill_ms**: one forward pass over a `[batch_size, prompt_len]` prompt (KV cache filled),
  median of `repeats` runs after `warmup` untimed runs.
* **decode_tokens_per_s**: `new_tokens` greedy steps, one token at a time with the KV cache, after
  the prefill (which is not timed); `batch_size * new_tokens / seconds`, median of `repeats` runs.
  A fixed number of steps (no early stop at EOS), so dense and pruned do the same work.
* **peak_mem_mb**: CUDA: `torch.cuda.max_memory_allocated` over one prefill + decode (weights
  included). CPU: weights + buffers (bytes of every tensor of the model) plus the peak growth of the
  process's resident set during one prefill + decode; the peak is reset before the run by writing
  `5` to `/proc/self/clear_refs` and read from `VmHWM` in `/proc/self/status` (Linux). Where that is
  not available the activation part is left out and `peak_mem_method` says so.
* CUDA timings are taken with `torch.cuda.synchronize()` around each run.

The prompt is the first `prompt_len` tokens of the evaluation text when a tokenizer is given, else
seeded random token ids. `measure_pair(dense, pruned)` runs both with identical settings, interleaved
(dense, pruned, dense, pruned...) so that machine noise hits both alike, and adds the speed-ups.
"""

from __future__ import annotations

import re
import statistics
import time

import torch
from torch import nn

from .errors import ConfigError

_PROC_STATUS = "/proc/self/status"


def _status_kb(key: str) -> int | None:
    try:
        with open(_PROC_STATUS) as f:
            m = re.search(key + r":\s+(\d+)\s*kB", f.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen:  # tied weights count once
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _prompt(model: nn.Module, tokenizer, prompt_len: int, batch_size: int, seed: int) -> torch.Tensor:
    if tokenizer is not None:
        from .data import eval_tokens

        ids = eval_tokens(tokenizer)[:prompt_len]
        if ids.numel() == prompt_len:
            return ids.unsqueeze(0).repeat(batch_size, 1)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, int(model.config.vocab_size), (batch_size, prompt_len), generator=g)


@torch.inference_mode()
def _prefill(model, ids):
    out = model(input_ids=ids, use_cache=True)
    return out.logits[:, -1], out.past_key_values


@torch.inference_mode()
def _decode(model, logits, past, steps: int):
    tok = logits.argmax(-1, keepdim=True)
    for _ in range(steps):
        out = model(input_ids=tok, past_key_values=past, use_cache=True)
        past = out.past_key_values
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return tok


def _one_run(model, ids, new_tokens, device) -> tuple[float, float]:
    _sync(device)
    t0 = time.perf_counter()
    logits, past = _prefill(model, ids)
    _sync(device)
    t1 = time.perf_counter()
    _decode(model, logits, past, new_tokens)
    _sync(device)
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, t2 - t1


def measure(model: nn.Module, tokenizer=None, prompt_len: int = 128, new_tokens: int = 32, batch_size: int = 1,
            repeats: int = 3, device: str | torch.device | None = None, warmup: int = 1, seed: int = 0) -> dict:
    """Params, FLOPs/token, prefill latency, decode tokens/s and peak memory (see module docstring)."""
    for name, v, lo in (("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 1), ("batch_size", batch_size, 1),
                        ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if not isinstance(v, int) or v < lo:
            raise ConfigError(f"evaluation.efficiency.{name}", v, f"an integer >= {lo}")
    from .metrics import flops_per_token
    from .models import resolve_device
    from .surgery import count_params

    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    model.to(dev).eval()
    ids = _prompt(model, tokenizer, prompt_len, batch_size, seed).to(dev)
    for _ in range(warmup):
        _one_run(model, ids, new_tokens, dev)
    pre, dec = [], []
    for _ in range(repeats):
        p, d = _one_run(model, ids, new_tokens, dev)
        pre.append(p)
        dec.append(batch_size * new_tokens / d)
    # peak memory: one extra, untimed run
    weights_mb = model_bytes(model) / 2**20
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        _one_run(model, ids, new_tokens, dev)
        peak, method = torch.cuda.max_memory_allocated(dev) / 2**20, "cuda.max_memory_allocated"
    else:
        rss0 = _status_kb("VmRSS")
        if rss0 is not None and _reset_rss_peak():
            _one_run(model, ids, new_tokens, dev)
            delta = max(0, (_status_kb("VmHWM") or rss0) - rss0) / 1024
            peak, method = weights_mb + delta, "weights + RSS peak growth (VmHWM after clear_refs)"
        else:
            peak, method = weights_mb, "weights only (no /proc RSS peak on this system)"
    return {
        "params": count_params(model),
        "flops_per_token": flops_per_token(model),
        "prefill_ms": statistics.median(pre),
        "decode_tokens_per_s": statistics.median(dec),
        "peak_mem_mb": peak,
        "weights_mb": weights_mb,
        "peak_mem_method": method,
        "settings": {"prompt_len": prompt_len, "new_tokens": new_tokens, "batch_size": batch_size,
                     "repeats": repeats, "warmup": warmup, "device": str(dev),
                     "threads": torch.get_num_threads() if dev.type == "cpu" else None},
    }


def measure_pair(dense: nn.Module, pruned: nn.Module, tokenizer=None, rounds: int = 1, **kwargs) -> dict:
    """Measure dense and pruned with identical settings, alternating `rounds` times (medians kept),
    plus `speedup` (prefill: dense/pruned time; decode: pruned/dense tokens/s) and memory ratio."""
    runs = {"dense": [], "pruned": []}
    for _ in range(rounds):
        runs["dense"].append(measure(dense, tokenizer, **kwargs))
        runs["pruned"].append(measure(pruned, tokenizer, **kwargs))
    out = {}
    for k, rs in runs.items():
        r = dict(rs[0])
        for key in ("prefill_ms", "decode_tokens_per_s", "peak_mem_mb"):
            r[key] = statistics.median(x[key] for x in rs)
        out[k] = r
    d, p = out["dense"], out["pruned"]
    out["speedup"] = {"prefill": d["prefill_ms"] / p["prefill_ms"],
                      "decode": p["decode_tokens_per_s"] / d["decode_tokens_per_s"],
                      "memory": d["peak_mem_mb"] / p["peak_mem_mb"],
                      "params": d["params"] / p["params"]}
    return out
