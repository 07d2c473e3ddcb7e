"""Optimal Brain Surgeon maths for column (structured) pruning, on plain tensors.

Everything here works on one linear map W [d_out, d_in] and the Hessian H [d_in, d_in] of the
layer-wise objective ||W X - Ŵ X||²_F (H ∝ X Xᵀ over calibration tokens). Pruning a set S of
*input columns* applies the same mask to every row, and all rows share H, so the row-wise OBS solution
is exact (SlimGPT, Ling et al. NeurIPS 2024, §3; ZipLM, Kurtic et al. 2023; GPTQ's Cholesky trick,
Frantar et al. 2023):

* one column q:  ΔE_q = ||W[:,q]||² / [H⁻¹]_qq,   ΔW = −W[:,q]·[H⁻¹]_{q,:} / [H⁻¹]_qq
* a set S:       ΔE_S = tr(W_S [(H⁻¹)_SS]⁻¹ W_Sᵀ), ΔW = −W_S [(H⁻¹)_SS]⁻¹ (H⁻¹)_{S,:}
* equivalently, on the kept set R:  Ŵ_R = W H[:,R] H[R,R]⁻¹,  Ŵ_S = 0  (least-squares refit).

Conventions: "pruned" columns of H have zero rows/columns and a unit diagonal, and the matching
W columns are zero; then H⁻¹ restricted to the live columns is the inverse of H restricted to them,
so recomputing H⁻¹ from the downdated H gives the exact sequential OBS quantities.
"""

from __future__ import annotations

import contextlib
import math
import threading

import torch

# -- TF32 off while OBS maths runs ------------------------------------------------------------------
# TF32 matmuls (10-bit mantissa) spoil fp32 Hessians and their inverses. The switch is process-wide, so
# it is counted: the first of any number of concurrent `exact_matmul` blocks (threads) turns TF32 off,
# the last one to leave restores the setting found by the first; no block runs with TF32 while another
# one is still inside, and the process is left as it was.
_TF32 = {"depth": 0, "saved": None}
_TF32_LOCK = threading.Lock()


@contextlib.contextmanager
def exact_matmul():
    """`with exact_matmul():` CUDA fp32 matmuls without TF32 for the block (nesting and threads safe)."""
    with _TF32_LOCK:
        if _TF32["depth"] == 0:
            _TF32["saved"] = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False
        _TF32["depth"] += 1
    try:
        yield
    finally:
        with _TF32_LOCK:
            _TF32["depth"] -= 1
            if _TF32["depth"] == 0:
                torch.backends.cuda.matmul.allow_tf32 = _TF32["saved"]

# -- Hessian preparation -------------------------------------------------------------------------


def prepare_hessian(H: torch.Tensor, W: torch.Tensor | None = None, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead inputs (H_jj == 0) get H_jj = 1 and W[:, j] = 0 (in place on W); then
    H ← H + λI with λ = percdamp · mean(diag H). Returns (damped H copy, dead mask)."""
    H = H.clone()
    dead = torch.diagonal(H) == 0
    if dead.any():
        H[dead, :] = 0
        H[:, dead] = 0
        H[dead, dead] = 1
        if W is not None:
            W[:, dead] = 0
    if percdamp > 0:
        lam = percdamp * torch.diagonal(H).mean()
        H += lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    return H, dead


def cholesky_inverse(H: torch.Tensor, retries: int = 4) -> torch.Tensor:
    """H⁻¹ through a Cholesky factorisation; on failure add 10x more damping (relative to
    mean(diag H), starting at 1e-6) and retry."""
    lam = 1e-6 * torch.diagonal(H).mean().abs().clamp_min(1e-30)
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    A = H
    for _ in range(retries + 1):
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            return torch.cholesky_inverse(L)
        A = H + lam * eye
        lam = lam * 10
    raise torch.linalg.LinAlgError("Hessian is not positive definite even after extra damping")


def downdate(H: torch.Tensor, cols: torch.Tensor) -> None:
    """Mark `cols` as pruned in H (in place): zero rows and columns, unit diagonal."""
    H[cols, :] = 0
    H[:, cols] = 0
    H[cols, cols] = 1


# -- scores ----------------------------------------------------------------------------------------


def _blocks(M: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """[G, d, d] diagonal blocks of M for `groups` ([G, d] column indices)."""
    return M[groups[:, :, None], groups[:, None, :]]


def column_scores(W: torch.Tensor, Hinv: torch.Tensor) -> torch.Tensor:
    """Plain OBS score per column: Σ_r W_rj² / [H⁻¹]_jj."""
    return (W * W).sum(0) / torch.diagonal(Hinv)


def naive_group_scores(W: torch.Tensor, Hinv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Σ_{j∈S} Σ_r W_rj² / [H⁻¹]_jj: columns treated as independent (the −GCD ablation)."""
    return column_scores(W, Hinv)[groups].sum(-1)


def grouped_cholesky_denominators(Hinv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """SlimGPT's grouped Cholesky: B_h = H⁻¹[S_h,S_h] = L_h L_hᵀ (one batched call); d_j = (L_h)_jj².
    d_j is the Schur-complement diagonal B_jj − B_{j,<j} B_{<j,<j}⁻¹ B_{<j,j}: the OBS denominator of
    column j once the earlier columns of its group are gone. [G, d]."""
    B = _blocks(Hinv, groups)
    L, info = torch.linalg.cholesky_ex(B)
    if bool((info != 0).any()):
        eye = torch.eye(B.shape[-1], dtype=B.dtype, device=B.device)
        B = B + 1e-10 * B.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None].abs() * eye
        L = torch.linalg.cholesky(B)
    return torch.diagonal(L, dim1=-2, dim2=-1) ** 2


def grouped_group_scores(W: torch.Tensor, Hinv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """E_h = Σ_{j∈S_h} Σ_r W_rj² / d_j with d_j from the grouped Cholesky (SlimGPT §3.2)."""
    d = grouped_cholesky_denominators(Hinv, groups)
    return ((W * W).sum(0)[groups] / d).sum(-1)


def exact_group_scores(W: torch.Tensor, Hinv: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """ZipLM's exact block OBS error tr(W_S B_S⁻¹ W_Sᵀ), B_S = H⁻¹[S,S] (the reference)."""
    B = _blocks(Hinv, groups)  # [G, d, d]
    WS = W[:, groups].permute(1, 0, 2)  # [G, d_out, d]
    L = torch.linalg.cholesky(B)
    Z = torch.linalg.solve_triangular(L, WS.transpose(1, 2), upper=False)  # L⁻¹ W_Sᵀ : [G, d, d_out]
    return (Z * Z).sum((1, 2))


GROUP_SCORES = {"grouped": grouped_group_scores, "exact": exact_group_scores, "naive": naive_group_scores}


# -- the OBS update -------------------------------------------------------------------------------


def obs_prune(W: torch.Tensor, H: torch.Tensor, cols: torch.Tensor, compensate: bool = True,
              Hinv: torch.Tensor | None = None) -> float:
    """Prune columns `cols` (in this order) of W with exact sequential OBS; W and H updated in place.

    GPTQ-style: permute `cols` first, take U = upper Cholesky factor of the permuted H⁻¹ (only its
    first |S| rows are formed); then, for
    k = 1..|S|, err_k = w_k / U_kk and w[k:] −= err_k·U[k, k:]. The local loop is the triangular
    solve Err = W_S U_SS⁻¹, and the update of the other columns is W_R −= Err·U[S, R]. The columns in
    `cols` end at zero and H is downdated. Returns the loss tr(ΔW H ΔWᵀ) = ||Err||²_F, the exact
    block OBS error. compensate=False only zeros the columns (the ablation); the returned loss is then
    the loss of zeroing, tr(W_S H_SS W_Sᵀ). `Hinv`: H⁻¹ if the caller has it already (saves a factorisation).
    """
    cols = torch.as_tensor(cols, dtype=torch.long, device=W.device)
    if cols.numel() == 0:
        return 0.0
    if not compensate:
        WS = W[:, cols]
        loss = float((WS @ H[cols][:, cols] * WS).sum())
        W[:, cols] = 0
        downdate(H, cols)
        return loss
    n = H.shape[0]
    mask = torch.ones(n, dtype=torch.bool, device=W.device)
    mask[cols] = False
    rest = torch.arange(n, device=W.device)[mask]
    if Hinv is None:
        Hinv = cholesky_inverse(H)
    # first |S| rows of the upper Cholesky factor of H⁻¹ permuted to (S, R): U_SS = chol(H⁻¹_SS),
    # U_SR = U_SSᵀ⁻¹ H⁻¹_SR (the rest of the factor is never needed)
    U_SS = torch.linalg.cholesky(Hinv[cols][:, cols], upper=True)
    U_SR = torch.linalg.solve_triangular(U_SS.T, Hinv[cols][:, rest], upper=False)
    err = torch.linalg.solve_triangular(U_SS, W[:, cols], upper=True, left=False)  # Err·U_SS = W_S
    W[:, rest] -= err @ U_SR
    W[:, cols] = 0
    downdate(H, cols)
    return float((err * err).sum())


def refit(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Closed-form least-squares refit on the kept columns: Ŵ_R = W H[:,R] H[R,R]⁻¹, Ŵ_S = 0."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    out = torch.zeros_like(W)
    out[:, keep] = torch.linalg.solve(H[keep][:, keep], (W @ H[:, keep]).T).T
    return out


def layer_loss(W: torch.Tensor, W_new: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ): the layer-wise reconstruction error on the calibration set."""
    D = W - W_new
    return float((D @ H * D).sum())


# -- head pruning (batched greedy, one unit per iteration) ---------------------------------------


def prune_groups(
    W: torch.Tensor,
    H: torch.Tensor,
    groups: torch.Tensor,
    n_remove: int,
    score: str = "grouped",
    compensate: bool = True,
    bucket: torch.Tensor | None = None,
    per_bucket: int | None = None,
) -> list[int]:
    """Greedy: repeat n_remove times — H⁻¹ from the current (downdated) H, score every live group
    (`score`: grouped | exact | naive), prune the lowest with exact sequential OBS.

    groups:  [G, d] column indices of each unit (a head, or a whole KV group of heads)
    bucket / per_bucket: optional constraint (GQA "per_group"): at most `per_bucket` units removed
             from each bucket (bucket[g] = the KV group of unit g).
    Returns the removed unit indices in removal order. W and H are updated in place."""
    fn = GROUP_SCORES[score]
    G = groups.shape[0]
    removed: list[int] = []
    taken = torch.zeros(G, dtype=torch.bool)
    for _ in range(n_remove):
        Hinv = cholesky_inverse(H)
        s = fn(W, Hinv, groups).to(torch.float64).cpu()
        s[taken] = math.inf
        if bucket is not None and per_bucket is not None:
            full = torch.zeros(G, dtype=torch.bool)
            for b in bucket.unique():
                sel = bucket == b
                if int((taken & sel).sum()) >= per_bucket:
                    full |= sel
            s[full] = math.inf
        g = int(torch.argmin(s))
        obs_prune(W, H, groups[g], compensate=compensate, Hinv=Hinv)
        taken[g] = True
        removed.append(g)
    return removed


# -- FFN pruning (batched greedy with dynamic group size) ----------------------------------------


def dgs_group_sizes(total: int, floor: int = 64, cap: int = 1024, dynamic: bool = True) -> list[int]:
    """Batch sizes for removing `total` channels.

    dynamic (SlimGPT's code): b₀ = ⌊(T−512)/2⌋, g_t = min(T − removed, max(b_t, floor), cap),
    b_{t+1} = ⌊(b_t − 512)/2⌋ — large first groups collapsing to `floor`.
    not dynamic (the −DGS ablation): fixed groups of `cap` (one-shot for T ≤ cap)."""
    sizes, removed = [], 0
    b = (total - 512) // 2
    while removed < total:
        g = min(total - removed, max(b, floor), cap) if dynamic else min(total - removed, cap)
        g = max(1, g)
        sizes.append(g)
        removed += g
        b = (b - 512) // 2
    return sizes


def prune_columns_batched(
    W: torch.Tensor,
    H: torch.Tensor,
    n_remove: int,
    sizes: list[int] | None = None,
    compensate: bool = True,
) -> list[int]:
    """Batched greedy over single columns: per batch, H⁻¹ from the current H, plain OBS scores,
    the g lowest live columns in ascending score order pruned with sequential OBS (no re-scoring
    inside a batch). Returns the removed columns in removal order."""
    sizes = sizes if sizes is not None else [n_remove]
    assert sum(sizes) == n_remove, (sizes, n_remove)
    live = torch.ones(H.shape[0], dtype=torch.bool)
    removed: list[int] = []
    for g in sizes:
        Hinv = cholesky_inverse(H)
        s = column_scores(W, Hinv).to(torch.float64).cpu()
        s[~live] = math.inf
        pick = torch.argsort(s, stable=True)[:g]
        obs_prune(W, H, pick.to(W.device), compensate=compensate, Hinv=Hinv)
        live[pick] = False
        removed.extend(int(i) for i in pick)
    return removed
