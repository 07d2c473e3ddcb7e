"""Settings of LLM-Streamline (block size, replacement variant, the replacement's training recipe)
and of its ShortGPT baseline."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...errors import validated
from ..base import MethodSettings


class StreamlineSettings(MethodSettings):
    replacement: Literal["none", "layer", "ffn", "collapse"] = Field(
        "layer",
        description="none (delete the block), layer (one decoder layer), ffn (residual FFN) or collapse "
        "(LaCo-style parameter merge of the block into one layer, untrained baseline)",
    )
    n_layers: int | None = Field(None, ge=1, description="layers to remove (net); overrides the ratio")
    # training of the replacement (recovery step)
    # defaults: the recipe that won out of domain on calibration-sized data (64 × 256 tokens, 1/8 held
    # out) in half the reference's time (benchmarks/RESULTS.md, ood-streamline); the reference trains at
    # 2e-4 on 30,000 samples with many more steps, a regime not measured here
    steps: int = Field(88, ge=0, description="optimiser steps")
    batch_size: int = Field(4, ge=1, description="token blocks per step")
    lr: float = Field(2e-3, gt=0, description="peak learning rate (AdamW)")
    min_lr: float = Field(2e-4, ge=0, description="floor of the cosine schedule")
    warmup_steps: int = Field(4, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(1e-3, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(5.0, gt=0, description="max gradient norm")
    val_fraction: float = Field(0.125, gt=0, lt=1, description="fraction of the training blocks held out")
    eval_every: int = Field(50, ge=1, description="validate every this many steps (and at the end)")
    loss_skip_tokens: int = Field(1, ge=0, description=(
        "leading tokens of each block left out of the MSE (default 1: the first position, the attention "
        "sink; leaving it out won out of domain in benchmarks/RESULTS.md, ood-streamline)"))
    seq_len: int = Field(128, ge=2, description="block length when the training ids come as one 1-D stream")
    max_blocks: int | None = Field(None, ge=2, description="at most this many training blocks (None: all)")
    cache_targets: bool = Field(
        True,
        description="keep each fixed batch's (input, target) after its first on-the-fly computation "
        "(same values, one dense pass per batch instead of one per epoch; memory grows with the data)",
    )
    seed: int = 0


class ShortGPTSettings(MethodSettings):
    n_layers: int | None = Field(None, ge=1, description="layers to remove; overrides the ratio")


def recovery_settings(raw: dict | None) -> StreamlineSettings:
    """Settings given to the recovery step (errors name `recovery.settings.<key>`)."""
    return validated(StreamlineSettings, raw, "recovery.settings")
