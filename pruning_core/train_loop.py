"""The optimisation loop shared by the recoveries that train on token blocks (LoRA with cross-entropy,
distillation): AdamW on fp32 master copies, linear warm-up then a constant or cosine schedule, gradient
clipping, seeded batches drawn without replacement."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from .errors import DataError


def lr_lambda(s, steps: int):
    """Multiplier of the peak lr at step k: linear warm-up, then constant or cosine down to min_lr."""
    floor = (s.min_lr / s.lr) if getattr(s, "min_lr", None) is not None else 0.0

    def f(k: int) -> float:
        if k < s.warmup_steps:
            return (k + 1) / (s.warmup_steps + 1)
        if getattr(s, "schedule", "constant") == "constant":
            return 1.0
        t = (k - s.warmup_steps) / max(1, steps - s.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


class _Masters:
    """fp32 master copies of half-precision trainable parameters (the optimiser steps the masters, the
    model gets them back in its own dtype); fp32 parameters are their own masters."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True)
                        for p in params]

    def grads_to_masters(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @torch.no_grad()
    def masters_to_params(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.copy_(m.to(p.dtype))


def fit(model: nn.Module, params: list[nn.Parameter], n: int, loss_of, s, progress=None) -> dict:
    """The optimisation loop shared by every recovery that trains with AdamW on token blocks: `steps`
    batches of `batch_size` block indices drawn without replacement (reshuffled each epoch, seeded),
    `loss_of(idx) -> (loss, {name: float})`, gradient clipping, warm-up + schedule (`lr_lambda`).
    Returns {loss_curve, parts (per-term curves), seconds, tokens/blocks seen}."""
    masters = _Masters(params)
    opt = torch.optim.AdamW(masters.masters, lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s, s.steps))
    g = torch.Generator().manual_seed(s.seed)
    order, pos = torch.randperm(n, generator=g), 0
    curve: list[float] = []
    parts: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    model.train()
    for step in range(s.steps):
        if pos + s.batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + s.batch_size]
        pos += s.batch_size
        loss, extra = loss_of(idx)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise DataError("recovery.settings.lr", s.lr, "a smaller learning rate (the loss became non-finite)")
        opt.zero_grad(set_to_none=True)
        for p in params:
            p.grad = None
        loss.backward()
        masters.grads_to_masters()
        torch.nn.utils.clip_grad_norm_(masters.masters, s.grad_clip)
        opt.step()
        sched.step()
        masters.masters_to_params()
        curve.append(value)
        for name, v in extra.items():
            parts.setdefault(name, []).append(v)
        if progress:
            progress(step + 1, s.steps, value)
    model.eval()
    return {"loss_curve": curve, "parts": parts, "seconds": time.perf_counter() - t0}
