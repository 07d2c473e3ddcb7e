"""LoRA recovery of a pruned model with peft, merged back into a plain checkpoint of the pruned shape.

A short causal-LM fine-tune on token blocks (by default the default text's *training* part, never
its evaluation part): low-rank adapters on the linear projections that survived pruning, AdamW,
linear warm-up then constant learning rate, gradient clipping. The adapter is then merged
(`merge_and_unload`), so the result has exactly the pruned shapes and saves/loads like any other
pruned checkpoint. `recovery: none` is the caller's business (nothing is called).

Reference: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021); LLM-Pruner and
SlimGPT recover their pruned models with the same LoRA recipe.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .adapters import adapter_for
from .errors import ConfigError, DataError, validated


class LoraSettings(BaseModel):
    """Settings of the LoRA recovery step (unknown keys rejected)."""

    model_config = ConfigDict(extra="forbid")

    targets: list[str] | None = Field(None, description="projection names (e.g. q_proj, down_proj); default: every linear projection of the decoder layers")
    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (scale = alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1)
    steps: int = Field(100, ge=1)
    lr: float = Field(2e-4, gt=0)
    batch_size: int = Field(4, ge=1)
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seq_len: int = Field(256, ge=2, description="block length when the training ids come as one 1-D stream")
    seed: int = 0


def parse_settings(settings: LoraSettings | dict | None) -> LoraSettings:
    if isinstance(settings, LoraSettings):
        return settings
    return validated(LoraSettings, settings, "recovery.settings")


def default_targets(model: nn.Module) -> list[str]:
    """Short names of the adapter's projections present in the (pruned) decoder layers."""
    ad = adapter_for(model)
    names = [ad.q, ad.k, ad.v, ad.o, *ad.mlp_in, ad.mlp_out]
    return [n for n in dict.fromkeys(names) if n]


def target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """Full module names of the non-empty nn.Linear layers whose short name is in `targets`,
    inside the decoder layers (lm_head and embeddings never get an adapter)."""
    ad = adapter_for(model)
    layers = ad.layers(model)
    prefix = {id(layer) for layer in layers}
    out = []
    for lname, layer in model.named_modules():
        if id(layer) not in prefix:
            continue
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear) and name.split(".")[-1] in targets and mod.weight.numel() > 0:
                out.append(f"{lname}.{name}")
    if not out:
        raise ConfigError("recovery.settings.targets", targets, "names of linear projections present in the model: "
                          + ", ".join(default_targets(model)))
    return out


def wrap_lora(model: nn.Module, targets: list[str] | None, rank: int, alpha: float, dropout: float, seed: int):
    """`model` wrapped with peft LoRA adapters on the non-empty decoder projections named in `targets`
    (default: every one); returns (peft model, trainable adapter parameters, in fp32 even on a
    half-precision base: their optimiser state is fp32)."""
    from peft import LoraConfig, get_peft_model

    modules = target_modules(model, targets or default_targets(model))
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, bias="none",
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return peft_model, params


def lora_recover(model: nn.Module, tokenizer, train_ids: torch.Tensor, settings: LoraSettings | dict | None = None,
                 device: str | torch.device | None = None, progress=None):
    """Fine-tune LoRA adapters on `train_ids` ([N, L] token blocks, or one 1-D stream cut into
    `settings.seq_len` blocks), merge them, return
    `(merged_model, {"loss_curve": [...], "seconds": s, "trainable_params": n, "targets": [...]})`.
    `progress(step, steps, loss)` is called after every optimiser step.

    `model` is modified in place (the adapters are merged into its weights) and returned in eval mode;
    its shapes are unchanged. `tokenizer` is not needed for training on token ids (kept for the API).
    """
    s = parse_settings(settings)
    if train_ids.ndim == 1:  # one token stream: cut into seq_len blocks
        n_blocks = train_ids.numel() // s.seq_len
        if n_blocks < 1:
            raise DataError("recovery.data", train_ids.numel(), f"a training text of at least {s.seq_len} tokens")
        train_ids = train_ids[: n_blocks * s.seq_len].view(n_blocks, s.seq_len)
    if train_ids.ndim != 2 or train_ids.shape[1] < 2:
        raise DataError("recovery.data", tuple(train_ids.shape), "token blocks of shape [N, L] with L >= 2")
    targets = s.targets or default_targets(model)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    model.to(device)
    shapes_before = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    peft_model, params = wrap_lora(model, targets, s.rank, s.alpha, s.dropout, s.seed)
    n_trainable = sum(p.numel() for p in params)

    def loss_of(idx):
        batch = train_ids[idx].to(device)
        return peft_model(input_ids=batch, labels=batch, use_cache=False).loss, {}

    from .train_loop import fit

    info = fit(peft_model, params, train_ids.shape[0], loss_of, s, progress)
    curve, seconds = info["loss_curve"], info["seconds"]
    merged = peft_model.merge_and_unload()
    merged.eval()
    for p in merged.parameters():
        p.requires_grad_(False)
    shapes_after = {k: tuple(v.shape) for k, v in merged.state_dict().items()}
    if shapes_after != shapes_before:  # merge_and_unload must give back the pruned model, nothing else
        raise RuntimeError("LoRA merge changed the model's tensors: " + str(set(shapes_after) ^ set(shapes_before))[:200])
    return merged, {"loss_curve": curve, "seconds": seconds, "trainable_params": n_trainable,
                    "targets": sorted(set(targets)), "settings": s.model_dump()}


def replacement_recover(pruned_model: nn.Module, dense_model: nn.Module, plan, train_ids: torch.Tensor,
                        settings=None, device: torch.device | str = "cpu",
                        progress=None) -> tuple[nn.Module, dict]:
    """LLM-Streamline's recovery: train the replacement module of `pruned_model` (in place) to map the
    removed block's input to its output in the frozen `dense_model` (or the list of the block's dense
    layers: `train_replacement`), on `train_ids`: [N, T] blocks, or a 1-D token stream cut into
    `seq_len` blocks (the first `max_blocks` of them when set). `settings`: StreamlineSettings, a dict
    (`recovery.settings`, unknown keys rejected) or None (the method's, `plan.settings`). Returns
    (model, info with `loss_curve`, `val_curve`, `val_mse_before` / `val_mse_after`)."""
    from .methods.streamline import StreamlineSettings, train_replacement
    from .methods.streamline.settings import recovery_settings

    if isinstance(settings, StreamlineSettings):
        s = settings
    elif settings is None:
        s = StreamlineSettings(**plan.settings)
    else:
        s = recovery_settings(settings)
    if train_ids.dim() == 1:
        n = train_ids.numel() // s.seq_len
        train_ids = train_ids[: n * s.seq_len].view(n, s.seq_len)
    if s.max_blocks is not None:
        train_ids = train_ids[: s.max_blocks]
    from .residency import placement_of

    info = train_replacement(dense_model, pruned_model, plan, train_ids, s, device=device, progress=progress)
    if placement_of(pruned_model) == "device":
        pruned_model.to("cpu")
    return pruned_model, info
