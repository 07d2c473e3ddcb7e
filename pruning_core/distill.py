"""Recovery by distillation from the dense model: the pruned student learns the dense teacher's
next-token distribution.

Loss: forward KL(teacher ‖ student) on next-token distributions at temperature T, scaled by T²
(Hinton et al., "Distilling the Knowledge in a Neural Network", 2015), plus an optional cross-entropy
term on the text's own next tokens (`ce_weight`, default 0: Minitron distils with the KL alone —
Sreenivas et al., "LLM Pruning and Distillation in Practice: The Minitron Approach", 2024, §3; Muralidharan
et al., "Compact Language Models via Pruning and Knowledge Distillation", 2024, §3.3).

The teacher is not run beside the student. Its top-k log-probs (indices and values, half precision) over
the training blocks are computed once (`teacher_topk`) and stored; training then holds only the student.
With k below the vocabulary the loss is the KL over the teacher's top-k entries plus one category for
the rest of the vocabulary (the teacher's mass outside its top-k against the student's mass outside the
same entries): the student keeps a tail where the teacher has one, which a renormalised top-k KL would
push to zero. With k = vocabulary it is the exact KL. `kept_mass` (the teacher's probability inside its top-k, averaged over tokens) says how faithful a
given k is.

The training text can be text the dense model writes itself (`source: teacher-samples`): sequences
sampled from BOS at temperature 1 (LLM-QAT's data-free distillation, Liu et al. 2023, §2.1). They cover
what the model knows rather than one corpus, so what is learnt on them is less tied to the calibration
domain (benchmarks/RESULTS.md, issue 20). `mix_samples` appends such samples to the training text's blocks:
the calibration domain and the model's own text side by side, which measured better out of domain than
either alone.

What is trained (`train`):
- `full`: every weight of the pruned model, AdamW on fp32 master copies when the model is half precision;
- `decoder`: as `full` without the embeddings and the LM head (tied or not). They hold a vector per vocabulary
  entry; with a narrow training text the output softmax still moves every row, towards that text. Frozen,
  they keep what the dense model knew of the tokens the text lacks, and the step skips their weight
  gradient and optimiser state (2 x 525 M parameters on Llama-3-8B; benchmarks/RESULTS.md, issue 20);
- `lora`: peft adapters on the decoder's linear projections, merged afterwards (the pruned shapes stay);
- `norms`: the RMS/LayerNorm weights and the biases only (a few thousand parameters: the cheapest).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from .errors import DataError, validated
from .train_loop import fit


class DistillSettings(BaseModel):
    """Settings of `recovery.kind: distill` (unknown keys rejected)."""

    model_config = ConfigDict(extra="forbid")

    train: Literal["full", "decoder", "lora", "norms"] = Field(
        "decoder", description="what is trained: every weight (fp32 masters), the decoder layers' weights and the "
        "final norm (embeddings and LM head frozen), LoRA adapters (merged), or norms + biases")
    # with a top-k teacher, T != 1 tempers the rest category as one entry, which understates the tail's
    # share at T > 1: on SmolLM2-135M SlimGPT 20 %, T = 2 took the student to 140 PPL out of domain where
    # T = 1 gave 54 (benchmarks/RESULTS.md, issue 20). T != 1 is exact only with top_k null
    temperature: float = Field(1.0, gt=0, description="softmax temperature of teacher and student (loss x T^2; "
                               "with a top-k teacher keep 1, see the comment)")
    ce_weight: float = Field(0.0, ge=0, description="weight of a cross-entropy term on the text's next tokens")
    top_k: int | None = Field(64, ge=1, description="teacher log-probs kept per token (null: the whole vocabulary)")
    min_kept_mass: float = Field(0.9, ge=0, le=1, description="below this mean teacher mass inside the top-k "
                                 "the report says k is too small to be faithful")
    steps: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(2e-4, gt=0, description="peak learning rate")  # measured: 5e-5 and 5e-4 worse (RESULTS.md)
    min_lr: float = Field(5e-6, ge=0, description="learning rate at the last step (cosine schedule)")
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    # the training text: any calibration source, or text sampled from the dense model (null: the run's
    # calibration text, blocks and seed)
    source: str | None = Field(None, description="training text (a calibration source, or teacher-samples: "
                               "sequences the dense model samples from BOS; null: calibration.source)")
    mix_samples: int = Field(0, ge=0, description="plus this many sequences the dense model samples from BOS "
                             "(teacher-samples, seq_len tokens each), appended to the training text's blocks: "
                             "general text beside the calibration domain (0: none)")
    sample_temperature: float = Field(1.0, gt=0, description="teacher-samples: sampling temperature")
    sample_batch_size: int = Field(16, ge=1, description="teacher-samples: sequences sampled at once")
    n_blocks: int | None = Field(None, ge=1, description="training blocks (null: calibration.n_samples)")
    seq_len: int | None = Field(None, ge=2, description="block length (null: calibration.seq_len)")
    data_seed: int | None = Field(None, description="block sampling seed (null: calibration.seed)")
    teacher_batch_size: int = Field(4, ge=1, description="blocks per teacher forward")
    teacher_dtype: Literal["float16", "float32"] = Field("float16", description="storage of the teacher's log-probs")
    # LoRA (train: lora)
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] | None = None


def parse_settings(settings: DistillSettings | dict | None) -> DistillSettings:
    if isinstance(settings, DistillSettings):
        return settings
    return validated(DistillSettings, settings, "recovery.settings")


TEACHER_SAMPLES = "teacher-samples"  # recovery.settings.source: text sampled from the dense model


@torch.no_grad()
def sample_from_teacher(model: nn.Module, n: int, seq_len: int, seed: int = 0, temperature: float = 1.0,
                        batch_size: int = 16, progress=None) -> torch.Tensor:
    """[n, seq_len] int64 token blocks sampled from `model` (ancestral sampling, KV cache, fp32
    softmax at `temperature`, no top-k / top-p), each starting with the BOS token. An EOS does not end a
    block: the model goes on with a new document, as in packed pre-training text. Batch b draws from a
    generator seeded with (seed, b): the same seed and batch size give the same blocks."""
    if n < 1 or seq_len < 2:
        raise DataError("recovery.settings.n_blocks", (n, seq_len), "at least 1 block of at least 2 tokens")
    cfg = model.config
    bos = getattr(cfg, "bos_token_id", None)
    if bos is None:
        bos = getattr(cfg, "eos_token_id", None)
    if isinstance(bos, (list, tuple)):
        bos = bos[0] if bos else None
    if bos is None:
        raise DataError("recovery.settings.source", TEACHER_SAMPLES, "a model whose config names a BOS (or EOS) token")
    model.eval()
    dev = _input_device(model)
    out = []
    for b, i in enumerate(range(0, n, batch_size)):
        m = min(batch_size, n - i)
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + b)
        ids = torch.full((m, 1), int(bos), dtype=torch.long)
        res = model(input_ids=ids.to(dev), use_cache=True)
        past, rows = res.past_key_values, [ids]
        for t in range(seq_len - 1):
            probs = torch.softmax(res.logits[:, -1].float().cpu() / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=g)
            rows.append(nxt)
            if t < seq_len - 2:
                res = model(input_ids=nxt.to(dev), past_key_values=past, use_cache=True)
                past = res.past_key_values
        out.append(torch.cat(rows, 1))
        del past, res
        if progress:
            progress(i + m, n)
    return torch.cat(out)


def teacher_bytes(n_tokens: int, k: int, value_bytes: int = 2) -> int:
    """Size of the stored teacher: int32 indices + fp16 (or `value_bytes`) log-probs per kept entry."""
    return n_tokens * k * (4 + value_bytes)


@torch.no_grad()
def teacher_topk(model: nn.Module, blocks: torch.Tensor, k: int | None, batch_size: int = 4,
                 progress=None, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The dense model's top-k next-token log-probs over `blocks` [N, T]: `indices` int32 [N, T, k],
    `values` [N, T, k] in `dtype` (fp16 by default; log-probs at temperature 1, computed in fp32), and `kept_mass` fp32 [N, T]
    (the probability inside the top-k). k None or >= vocabulary keeps every entry."""
    if blocks.ndim != 2 or blocks.shape[1] < 2:
        raise DataError("recovery.data", tuple(blocks.shape), "token blocks of shape [N, L] with L >= 2")
    model.eval()
    dev = _input_device(model)
    idx_out, val_out, mass_out = [], [], []
    n = blocks.shape[0]
    for i in range(0, n, batch_size):
        logits = model(input_ids=blocks[i:i + batch_size].to(dev), use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
        kk = logp.shape[-1] if k is None else min(k, logp.shape[-1])
        vals, idx = logp.topk(kk, dim=-1, sorted=True)
        idx_out.append(idx.to(torch.int32).cpu())
        val_out.append(vals.to(dtype).cpu())
        mass_out.append(vals.exp().sum(-1).cpu())
        del logits, logp
        if progress:
            progress(min(i + batch_size, n), n)
    return {"indices": torch.cat(idx_out), "values": torch.cat(val_out), "kept_mass": torch.cat(mass_out)}


class _TopKKL(torch.autograd.Function):
    """Mean over tokens of KL(p ‖ q) over the teacher's k kept entries plus one "rest" category that
    holds the probability outside them (teacher: 1 - its kept mass; student: its mass outside the
    teacher's top-k). Without the rest category a sparse KL pushes the student's tail to zero, and the
    tail is where text unlike the training text lives. q = softmax(z / T). The gradient is written out:
    d/dz_j = (q_j - p_j) / T for j in the top-k, q_j (1 - p_rest / q_rest) / T outside; it is exactly zero
    where the student's distribution is the teacher's (autograd through log_softmax leaves a rounding
    residue there that AdamW turns into steps of size lr)."""

    @staticmethod
    def forward(ctx, z, t_idx, t_logp, temperature):
        s_logp = torch.log_softmax(z / temperature, dim=-1)
        p = t_logp.exp()
        kl = (p * (t_logp - s_logp.gather(-1, t_idx))).sum(-1)
        ratio = torch.zeros_like(kl)
        if t_idx.shape[-1] < z.shape[-1]:  # the rest category (none when every entry is kept)
            p_rest = (1 - p.sum(-1)).clamp_min(0)
            s_rest = torch.logsumexp(s_logp.scatter(-1, t_idx, float("-inf")), dim=-1)
            kl = kl + torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-30).log() - s_rest), 0.0)
            ratio = p_rest / s_rest.exp()
        ctx.save_for_backward(s_logp, t_idx, p, ratio)
        ctx.temperature = temperature
        return kl.mean()

    @staticmethod
    def backward(ctx, grad):
        s_logp, t_idx, p, ratio = ctx.saved_tensors
        q = s_logp.exp_()  # in place: s_logp is not needed again
        g = q * (1 - ratio.unsqueeze(-1))
        g.scatter_(-1, t_idx, q.gather(-1, t_idx) - p)
        n_tok = g.numel() // g.shape[-1]
        return g * (grad / (n_tok * ctx.temperature)), None, None, None


def kl_loss(student_logits: torch.Tensor, t_idx: torch.Tensor, t_val: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(teacher ‖ student) per token, averaged, times T². The teacher is given by its kept
    log-probs `t_val` (temperature 1) at indices `t_idx` ([..., k]); with k below the vocabulary the
    probability outside them is one more category (`_TopKKL`). At T != 1 the kept entries and the rest
    category are tempered jointly (exact at k = vocabulary; the rest category is tempered as one)."""
    T = float(temperature)
    v = t_val.float()
    if T != 1.0:
        if v.shape[-1] == student_logits.shape[-1]:
            v = torch.log_softmax(v / T, dim=-1)
        else:
            rest = torch.log1p(-v.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
            v = torch.log_softmax(torch.cat([v, rest], -1) / T, dim=-1)[..., :-1]
    return _TopKKL.apply(student_logits.float(), t_idx.long(), v, T) * (T * T)


def _input_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings()
    w = getattr(emb, "weight", None)
    return w.device if w is not None and w.device.type != "meta" else torch.device("cpu")


def _trainable(model: nn.Module, s: DistillSettings) -> tuple[nn.Module, list[nn.Parameter], int]:
    """(module to call, trainable parameters, count) for `s.train`; LoRA wraps the model with peft."""
    for p in model.parameters():
        p.requires_grad_(False)
    if s.train == "lora":
        from .recover import wrap_lora

        wrapped, params = wrap_lora(model, s.targets, s.rank, s.alpha, s.dropout, s.seed)
        return wrapped, params, sum(p.numel() for p in params)
    if s.train in ("full", "decoder"):
        params = list(dict.fromkeys(model.parameters()))  # tied embeddings counted once
        if s.train == "decoder":
            frozen = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings())
                      if m is not None and getattr(m, "weight", None) is not None}
            params = [p for p in params if id(p) not in frozen]
    else:  # norms + biases
        params = [p for name, p in model.named_parameters()
                  if name.endswith(".bias") or "norm" in name.split(".")[-2].lower()]
    for p in params:
        p.requires_grad_(True)
    return model, params, sum(p.numel() for p in params)


def distill_recover(model: nn.Module, blocks: torch.Tensor, teacher: dict[str, torch.Tensor],
                    settings: DistillSettings | dict | None = None, device: str | torch.device | None = None,
                    progress=None) -> tuple[nn.Module, dict]:
    """Train `model` (the pruned student, in place) towards the stored teacher on `blocks` [N, T]
    (the blocks the teacher was computed on: `teacher["indices"]` [N, T, k], `teacher["values"]`).
    Returns (model in eval mode with the pruned shapes, info: loss_curve (the total), kl_curve, ce_curve,
    seconds, tokens_seen, tokens_per_s, trainable_params, train, kept_mass, teacher_bytes, settings)."""
    s = parse_settings(settings)
    t_idx, t_val = teacher["indices"], teacher["values"]
    if blocks.ndim != 2 or t_idx.shape[:2] != blocks.shape or t_val.shape != t_idx.shape:
        raise DataError("recovery.teacher", tuple(t_idx.shape),
                        f"teacher log-probs for the training blocks {tuple(blocks.shape)} (recompute the teacher)")
    device = torch.device(device) if device is not None else _input_device(model)
    model.to(device)
    shapes_before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    torch.manual_seed(s.seed)
    net, params, n_trainable = _trainable(model, s)

    def loss_of(idx):
        ids = blocks[idx].to(device)
        logits = net(input_ids=ids, use_cache=False).logits
        kl = kl_loss(logits, t_idx[idx].to(device), t_val[idx].to(device), s.temperature)
        parts = {"kl": float(kl.detach())}
        loss = kl
        if s.ce_weight > 0:
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            parts["ce"] = float(ce.detach())
            loss = kl + s.ce_weight * ce
        return loss, parts

    info = fit(net, params, blocks.shape[0], loss_of, s, progress)
    if s.train == "lora":
        model = net.merge_and_unload()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    shapes_after = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if shapes_after != shapes_before:
        raise RuntimeError("distillation changed the model's tensors: " + str(set(shapes_after) ^ set(shapes_before))[:200])
    tokens = s.steps * s.batch_size * blocks.shape[1]
    kept = float(teacher["kept_mass"].float().mean()) if "kept_mass" in teacher else None
    k = t_idx.shape[-1]
    return model, {
        "loss_curve": info["loss_curve"], "kl_curve": info["parts"].get("kl", []),
        "ce_curve": info["parts"].get("ce", []), "seconds": info["seconds"], "tokens_seen": tokens,
        "tokens_per_s": tokens / max(info["seconds"], 1e-9), "trainable_params": n_trainable, "train": s.train,
        "top_k": k, "kept_mass": kept, "k_faithful": None if kept is None else kept >= s.min_kept_mass,
        "teacher_bytes": teacher_bytes(t_idx.shape[0] * t_idx.shape[1], k, t_val.element_size()), "settings": s.model_dump(),
    }
