"""OBS maths on synthetic float64 matrices: the closed-form refit, the one-column OBS update and its
predicted loss, compensation never worse than zeroing, the grouped score (SlimGPT §3.2)."""

from __future__ import annotations

import pytest
import torch

from pruning_core import obs


def _problem(d_out=12, d_in=24, tokens=200, seed=0, latent=6):
    g = torch.Generator().manual_seed(seed)
    # correlated inputs: a few latent factors plus noise, so the refit has something to do
    Z = torch.randn(latent, tokens, generator=g, dtype=torch.float64)
    A = torch.randn(d_in, latent, generator=g, dtype=torch.float64)
    X = A @ Z + 0.3 * torch.randn(d_in, tokens, generator=g, dtype=torch.float64)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    H = 2 * X @ X.T / tokens
    Hd, _ = obs.prepare_hessian(H, W, percdamp=0.01)
    return W, Hd, X


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_one_column_matches_obs_formula_and_predicted_loss():
    W, H, _ = _problem()
    q = 5
    Hinv = torch.linalg.inv(H)
    expected = W - torch.outer(W[:, q], Hinv[q, :]) / Hinv[q, q]
    W2, H2 = W.clone(), H.clone()
    loss = obs.obs_prune(W2, H2, torch.tensor([q]))
    assert _rel(W2, expected) < 1e-10
    assert torch.all(W2[:, q] == 0)
    predicted = float((W[:, q] ** 2).sum() / Hinv[q, q])
    assert abs(loss - predicted) / predicted < 1e-10
    assert abs(obs.layer_loss(W, W2, H) - predicted) / predicted < 1e-10
    # the column's Hessian row/column are downdated to a unit diagonal
    assert H2[q, q] == 1 and torch.all(H2[q, :q] == 0) and torch.all(H2[:q, q] == 0)


@pytest.mark.parametrize("score", ["grouped", "exact", "naive"])
def test_heads_over_several_iterations_equal_closed_form_refit(score):
    W, H, _ = _problem(d_in=24)
    groups = torch.arange(24).view(6, 4)  # 6 "heads" of 4 columns
    W2, H2 = W.clone(), H.clone()
    removed = obs.prune_groups(W2, H2, groups, n_remove=3, score=score)
    assert len(set(removed)) == 3
    keep = torch.cat([groups[g] for g in range(6) if g not in removed])
    assert _rel(W2, obs.refit(W, H, keep)) <= 1e-8


@pytest.mark.parametrize("sizes", [[7], [5, 3, 1, 7], [1] * 6, [16]])
def test_ffn_batches_of_any_size_equal_closed_form_refit(sizes):
    W, H, _ = _problem(d_in=24)
    W2, H2 = W.clone(), H.clone()
    removed = obs.prune_columns_batched(W2, H2, sum(sizes), sizes=sizes)
    assert len(set(removed)) == sum(sizes)
    keep = torch.tensor(sorted(set(range(24)) - set(removed)))
    assert _rel(W2, obs.refit(W, H, keep)) <= 1e-8
    assert torch.all(W2[:, removed] == 0)


def test_block_loss_is_the_exact_score_and_grouped_is_between_naive_and_exact():
    W, H, _ = _problem(d_in=24, seed=3)
    groups = torch.arange(24).view(6, 4)
    Hinv = torch.linalg.inv(H)
    exact = obs.exact_group_scores(W, Hinv, groups)
    grouped = obs.grouped_group_scores(W, Hinv, groups)
    naive = obs.naive_group_scores(W, Hinv, groups)
    assert torch.all(grouped >= naive * (1 - 1e-12))
    assert (grouped > naive).any()
    for g in range(6):  # realised loss of pruning head g alone is the exact block score
        W2, H2 = W.clone(), H.clone()
        loss = obs.obs_prune(W2, H2, groups[g])
        assert abs(loss - float(exact[g])) / float(exact[g]) < 1e-9
        assert abs(obs.layer_loss(W, W2, H) - float(exact[g])) / float(exact[g]) < 1e-9


def test_grouped_denominators_are_schur_complements_and_reduce_to_obs_for_size_one():
    W, H, _ = _problem(d_in=12, seed=1)
    Hinv = torch.linalg.inv(H)
    groups = torch.arange(12).view(3, 4)
    d = obs.grouped_cholesky_denominators(Hinv, groups)
    for g in range(3):
        B = Hinv[groups[g]][:, groups[g]]
        for j in range(4):
            schur = B[j, j] - (B[j, :j] @ torch.linalg.solve(B[:j, :j], B[:j, j]) if j else 0)
            assert abs(float(d[g, j] - schur)) < 1e-12 * float(B[j, j])
    single = torch.arange(12).view(12, 1)
    assert torch.allclose(obs.grouped_group_scores(W, Hinv, single), obs.column_scores(W, Hinv), rtol=1e-12)


def test_compensation_never_worse_than_zeroing_for_the_same_mask():
    for seed in range(5):
        W, H, _ = _problem(seed=seed)
        cols = torch.randperm(24, generator=torch.Generator().manual_seed(seed))[:10]
        Wc, Wz = W.clone(), W.clone()
        obs.obs_prune(Wc, H.clone(), cols, compensate=True)
        zloss = obs.obs_prune(Wz, H.clone(), cols, compensate=False)
        assert torch.all(Wz[:, cols] == 0) and torch.equal(Wz[:, [i for i in range(24) if i not in cols]],
                                                             W[:, [i for i in range(24) if i not in cols]])
        assert abs(zloss - obs.layer_loss(W, Wz, H)) < 1e-9 * zloss
        assert obs.layer_loss(W, Wc, H) < obs.layer_loss(W, Wz, H)


def test_dead_inputs_and_damping():
    W, H, _ = _problem(d_in=8)
    H[3, :] = 0
    H[:, 3] = 0
    W2 = W.clone()
    Hd, dead = obs.prepare_hessian(H, W2, percdamp=0.1)
    assert dead.tolist() == [i == 3 for i in range(8)]
    assert torch.all(W2[:, 3] == 0)
    mean_diag = (torch.diagonal(H).sum() + 1) / 8  # dead column's diagonal set to 1 before damping
    assert torch.allclose(torch.diagonal(Hd)[3], 1 + 0.1 * mean_diag)
    # a singular H (rank 2) still inverts thanks to the retry with extra damping
    v = torch.randn(8, 2, dtype=torch.float64)
    Hinv = obs.cholesky_inverse(v @ v.T)
    assert torch.isfinite(Hinv).all()


def test_dgs_schedule_matches_the_reference_code():
    assert obs.dgs_group_sizes(688) == [88] + [64] * 9 + [24]
    s = obs.dgs_group_sizes(2752)
    assert s[:3] == [1024, 304, 64] and sum(s) == 2752 and len(s) == 25
    s = obs.dgs_group_sizes(6867)
    assert s[:4] == [1024, 1024, 410, 64] and sum(s) == 6867 and len(s) == 72
    assert obs.dgs_group_sizes(100, floor=8) == [8] * 12 + [4]
    assert obs.dgs_group_sizes(1500, dynamic=False) == [1024, 476]
