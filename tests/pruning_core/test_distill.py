"""Distillation from the dense model: the stored teacher, the KL loss and its gradient, training."""

from __future__ import annotations

import copy

import pytest
import torch

from pruning_core.checkpoint import load_pruned, save_pruned
from pruning_core.distill import (
    DistillSettings,
    distill_recover,
    kl_loss,
    parse_settings,
    sample_from_teacher,
    teacher_topk,
)
from pruning_core.errors import ConfigError, DataError
from pruning_core.models import tiny_model
from pruning_core.plan import LayerPlan, PrunePlan
from pruning_core.surgery import apply_plan

pytestmark = pytest.mark.usefixtures("one_thread")


def _blocks(n=8, L=24, seed=0, vocab=60):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n, L), generator=g)


@torch.no_grad()
def _logp(model, ids):
    return torch.log_softmax(model(input_ids=ids).logits.float(), -1)


def test_teacher_keeps_the_dense_models_own_log_probs():
    model = tiny_model("llama", n_layers=2, seed=1)
    ids = _blocks()
    full = teacher_topk(model, ids, None, batch_size=3, dtype=torch.float32)
    ref = _logp(model, ids)
    V = ref.shape[-1]
    assert full["indices"].shape == (8, 24, V) and full["indices"].dtype == torch.int32
    # every vocabulary entry, sorted by probability: gathering the reference at the indices gives the values
    assert torch.allclose(ref.gather(-1, full["indices"].long()), full["values"], atol=1e-5)
    assert torch.allclose(full["kept_mass"], torch.ones(8, 24), atol=1e-4)
    top = teacher_topk(model, ids, 5, batch_size=8)  # default: half precision, the 5 most probable
    assert top["values"].dtype == torch.float16 and top["indices"].shape == (8, 24, 5)
    assert torch.equal(top["indices"], full["indices"][..., :5])
    assert torch.allclose(top["values"].float(), full["values"][..., :5], atol=2e-2)
    assert bool((top["kept_mass"] < 1).all()) and bool((top["kept_mass"] > 0).all())


def _reference_kl(z, idx, vals, T):
    """The top-k + rest KL written with autograd: k kept teacher entries and one category for the rest."""
    s_logp = torch.log_softmax(z / T, -1)
    if idx.shape[-1] == z.shape[-1]:
        tp = torch.log_softmax(vals / T, -1)
        return (tp.exp() * (tp - s_logp.gather(-1, idx))).sum(-1).mean() * T * T
    rest = torch.log1p(-vals.exp().sum(-1, keepdim=True))
    joint = torch.log_softmax(torch.cat([vals, rest], -1) / T, -1)  # teacher's k + rest, tempered
    s_rest = torch.log1p(-s_logp.gather(-1, idx).exp().sum(-1, keepdim=True))
    s_joint = torch.cat([s_logp.gather(-1, idx), s_rest], -1)
    return (joint.exp() * (joint - s_joint)).sum(-1).mean() * T * T


def test_kl_loss_is_the_forward_kl_and_its_gradient_is_autograds():
    z = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    t = torch.log_softmax(torch.randn(2, 5, 11, dtype=torch.float64), -1)
    for k, T in ((11, 1.0), (11, 2.0), (4, 1.0), (4, 2.0), (1, 1.0)):
        vals, idx = t.topk(k, -1)
        got = kl_loss(z, idx, vals, T)
        (g_got,) = torch.autograd.grad(got, z)
        ref = _reference_kl(z, idx, vals, T)
        (g_ref,) = torch.autograd.grad(ref, z)
        assert abs(float(got.detach()) - float(ref.detach())) < 1e-5 and float(got.detach()) > 0
        assert torch.allclose(g_got.double(), g_ref, atol=1e-6)
    # k = vocabulary at T = 1: torch's own KL divergence
    vals, idx = t.topk(11, -1)
    exact = torch.nn.functional.kl_div(torch.log_softmax(z, -1), t, log_target=True, reduction="sum") / 10
    assert abs(float(kl_loss(z, idx, vals).detach()) - float(exact.detach())) < 1e-5


def test_a_top_k_teacher_keeps_the_students_tail():
    """The rest category: a student equal to the teacher has zero loss and zero gradient at any k, so
    nothing pushes its mass outside the top-k to zero (a renormalised top-k KL would)."""
    z = torch.randn(3, 7, 50)
    vals, idx = torch.log_softmax(z, -1).topk(5, -1)
    zz = z.clone().requires_grad_(True)
    loss = kl_loss(zz, idx, vals)
    (g,) = torch.autograd.grad(loss, zz)
    assert abs(float(loss.detach())) < 1e-6 and float(g.abs().max()) < 1e-7


@pytest.mark.parametrize("train", ["full", "decoder", "lora", "norms"])
def test_teacher_equal_to_student_gives_zero_loss_and_leaves_the_weights_unchanged(train):
    """Ratio 0: the student is the dense model. The KL is exactly 0 at every step, and AdamW moves nothing."""
    model = tiny_model("llama", n_layers=2, seed=1)
    ids = _blocks()
    teacher = teacher_topk(model, ids, None, batch_size=1, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    student, info = distill_recover(copy.deepcopy(model), ids, teacher,
                                    {"train": train, "steps": 3, "batch_size": 1, "lr": 1e-2, "warmup_steps": 0})
    assert info["kl_curve"] == [0.0, 0.0, 0.0]
    after = student.state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def _pruned_tiny(seed=1):
    model = tiny_model("llama", n_layers=2, seed=seed)
    plan = PrunePlan("test", {}, [LayerPlan(0, heads=[2, 3], kv_heads=[1], ffn=list(range(0, 96, 2))),
                                  LayerPlan(1, ffn=list(range(64)))])
    return model, apply_plan(copy.deepcopy(model), plan)


def _heldout_kl(student, teacher_model, ids) -> float:
    t = _logp(teacher_model, ids)
    s = _logp(student, ids)
    return float((t.exp() * (t - s)).sum(-1).mean())


@pytest.mark.parametrize("train", ["full", "lora"])
def test_distillation_moves_the_pruned_student_towards_the_teacher(train, tmp_path):
    dense, pruned = _pruned_tiny()
    ids, held = _blocks(16), _blocks(8, seed=5)
    teacher = teacher_topk(dense, ids, None, batch_size=4)  # a random tiny model is near-uniform: keep all
    shapes = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    kl0 = _heldout_kl(pruned, dense, held)
    lr = 1e-3 if train == "full" else 1e-2
    student, info = distill_recover(pruned, ids, teacher, {"train": train, "steps": 30, "batch_size": 4, "lr": lr})
    assert _heldout_kl(student, dense, held) < 0.7 * kl0
    assert sum(info["kl_curve"][-5:]) < sum(info["kl_curve"][:5])
    assert info["tokens_seen"] == 30 * 4 * 24 and info["top_k"] == 128
    assert info["teacher_bytes"] == 16 * 24 * 128 * 6
    # the pruned shapes, a plain model, and a checkpoint that loads back to the same logits
    assert type(student).__name__ == "LlamaForCausalLM"
    assert {k: tuple(v.shape) for k, v in student.state_dict().items()} == shapes
    again, _ = load_pruned(save_pruned(student, None, None, tmp_path / "d"))
    with torch.no_grad():
        assert torch.allclose(again(input_ids=held).logits, student(input_ids=held).logits, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_decoder_training_leaves_the_embeddings_and_the_head_as_they_were(tied):
    """`train: decoder`: every decoder weight and the final norm move, the token embeddings and the LM head
    (one tensor when tied, two when not) stay bit for bit."""
    dense, pruned = _pruned_tiny()
    emb = pruned.model.embed_tokens.weight
    pruned.lm_head.weight = emb if tied else torch.nn.Parameter(emb.detach().clone() + 0.01)
    ids = _blocks(8)
    teacher = teacher_topk(dense, ids, None)
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    student, info = distill_recover(pruned, ids, teacher, {"train": "decoder", "steps": 3, "lr": 1e-3,
                                                           "warmup_steps": 0})
    after = student.state_dict()
    frozen = {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(torch.equal(after[k], before[k]) for k in frozen)
    moved = {k for k in before if not torch.equal(after[k], before[k])}
    assert moved == set(before) - frozen
    n_emb = before["model.embed_tokens.weight"].numel() * (1 if tied else 2)
    assert info["trainable_params"] == sum(p.numel() for p in dict.fromkeys(student.parameters())) - n_emb


def test_half_precision_student_trains_on_fp32_masters():
    dense, pruned = _pruned_tiny()
    ids = _blocks(8)
    teacher = teacher_topk(dense, ids, 16)
    student = pruned.to(torch.bfloat16)
    w0 = student.model.layers[0].mlp.down_proj.weight.clone()
    student, info = distill_recover(student, ids, teacher, {"train": "full", "steps": 4, "lr": 1e-3})
    w1 = student.model.layers[0].mlp.down_proj.weight
    assert w1.dtype == torch.bfloat16 and not torch.equal(w0, w1)
    assert all(p.dtype == torch.bfloat16 for p in student.parameters())


def test_ce_weight_adds_a_cross_entropy_term_and_k_faithfulness_is_reported():
    dense, pruned = _pruned_tiny()
    ids = _blocks(8)
    teacher = teacher_topk(dense, ids, 2)  # two entries of a near-uniform tiny model: far from faithful
    _, info = distill_recover(pruned, ids, teacher, {"steps": 2, "ce_weight": 0.5, "min_kept_mass": 0.9})
    assert len(info["ce_curve"]) == 2 and info["loss_curve"][0] > info["kl_curve"][0]
    assert info["kept_mass"] < 0.9 and info["k_faithful"] is False


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="recovery.settings.train"):
        parse_settings({"train": "everything"})
    with pytest.raises(ConfigError, match="recovery.settings"):
        parse_settings({"stepz": 3})
    assert parse_settings(None) == DistillSettings()
    model = tiny_model("llama", n_layers=1, seed=0)
    t = teacher_topk(model, _blocks(4), 4)
    with pytest.raises(DataError, match="recovery.teacher"):  # a teacher of other blocks
        distill_recover(model, _blocks(5), t, {"steps": 1})


@torch.no_grad()
def test_teacher_samples_are_the_models_own_continuations_from_bos():
    """At a temperature near 0 ancestral sampling is greedy decoding: the KV-cache loop must give what a
    full forward over the prefix gives at every step. At temperature 1 the draw is seeded (the same seed
    gives the same blocks, another seed others) and every block starts with BOS."""
    torch.manual_seed(0)
    model = tiny_model(vocab=60, n_layers=2).eval()
    model.config.bos_token_id = 2
    cold = sample_from_teacher(model, 3, 12, seed=0, temperature=1e-6, batch_size=2)
    ids = torch.full((3, 1), 2)
    for _ in range(11):  # greedy, recomputing the whole prefix (no cache)
        ids = torch.cat([ids, model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cold, ids)
    a = sample_from_teacher(model, 5, 16, seed=1, batch_size=2)
    assert a.shape == (5, 16) and a.dtype == torch.long and (a[:, 0] == 2).all()
    assert torch.equal(a, sample_from_teacher(model, 5, 16, seed=1, batch_size=2))
    assert not torch.equal(a, sample_from_teacher(model, 5, 16, seed=2, batch_size=2))
    model.config.bos_token_id = model.config.eos_token_id = None
    with pytest.raises(DataError, match="recovery.settings.source"):
        sample_from_teacher(model, 1, 4)
