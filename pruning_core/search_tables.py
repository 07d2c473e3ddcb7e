"""`schedule: search`, part (a): the per-layer tables (see `pruning_core.search` for the method and its
references). Kept apart from the solve so that a method's prune / select code does not depend on the OBS
code: under the pipeline the tables are their own cached step (`layer_tables`), an input of the prune."""

from __future__ import annotations

import math
import time

import torch

from .search import SearchSettings, resolved_sensitivity


def _obs_column_losses(W: torch.Tensor, H: torch.Tensor, cols: torch.Tensor, Hinv: torch.Tensor,
                       compensate: bool) -> torch.Tensor:
    """`obs.obs_prune` that returns the loss of every removed column (their sum is its loss)."""
    from .obs import downdate

    if not compensate:
        losses = []
        for c in cols.tolist():  # zeroing one at a time: the increments of tr(W_S H_SS W_Sᵀ)
            w = W[:, c].clone()
            cross = 2 * float((W @ H[:, c]) @ w) - float((w * w).sum() * H[c, c])
            losses.append(cross)
            W[:, c] = 0
        downdate(H, cols)
        return torch.tensor(losses, dtype=torch.float64)
    n = H.shape[0]
    mask = torch.ones(n, dtype=torch.bool, device=W.device)
    mask[cols] = False
    rest = torch.arange(n, device=W.device)[mask]
    U_SS = torch.linalg.cholesky(Hinv[cols][:, cols], upper=True)
    U_SR = torch.linalg.solve_triangular(U_SS.T, Hinv[cols][:, rest], upper=False)
    err = torch.linalg.solve_triangular(U_SS, W[:, cols], upper=True, left=False)
    W[:, rest] -= err @ U_SR
    W[:, cols] = 0
    downdate(H, cols)
    return (err * err).sum(0).double().cpu()


def ffn_curve(W: torch.Tensor, H: torch.Tensor, batch: int = 128, compensate: bool = True,
              ref: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Layer loss after removing k = 0..n columns of W by SlimGPT's batched greedy OBS (the sequential
    OBS error of each removed column, cumulated; k = n is the loss of removing the whole block).
    W, H are modified. Returns (curve [n+1], W after `ref` columns or None)."""
    from .obs import cholesky_inverse, column_scores

    n = H.shape[0]
    energy = float((W @ H * W).sum())
    live = torch.ones(n, dtype=torch.bool)
    losses, done, snap = [], 0, None
    while done < n - 1:
        g = min(batch, n - 1 - done)
        if ref is not None and done < ref < done + g:
            g = ref - done
        Hinv = cholesky_inverse(H)
        s = column_scores(W, Hinv).to(torch.float64).cpu()
        s[~live] = math.inf
        pick = torch.argsort(s, stable=True)[:g]
        losses.append(_obs_column_losses(W, H, pick.to(W.device), Hinv, compensate))
        live[pick] = False
        done += g
        if ref is not None and done == ref:
            snap = W.clone()
    curve = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cat(losses).cumsum(0)]) if losses else torch.zeros(1)
    curve = torch.cat([curve, torch.tensor([energy], dtype=torch.float64)])
    return torch.cummax(curve, 0).values, snap


def head_curve(W: torch.Tensor, H: torch.Tensor, n_heads: int, n_kv: int, hd: int, gqa: str,
               score: str = "grouped", compensate: bool = True, ref: int = 1):
    """Layer loss after removing k = 0..n_units head units (KV groups, or one query head in every group),
    k = n_units meaning the whole attention block; and W after `ref` units."""
    from .methods.slimgpt import _head_groups
    from .obs import layer_loss, prune_groups

    groups, bucket = _head_groups(n_heads, n_kv, hd, gqa)
    n_units = n_kv if bucket is None else n_heads // n_kv
    out, snap = [0.0], None
    for k in range(1, n_units):
        Wk, Hk = W.clone(), H.clone()
        if bucket is None:
            prune_groups(Wk, Hk, groups, k, score, compensate)
        else:
            prune_groups(Wk, Hk, groups, k * n_kv, score, compensate, bucket=bucket, per_bucket=k)
        out.append(layer_loss(W, Wk, H))
        if k == ref:
            snap = Wk
    out.append(float((W @ H * W).sum()))
    return torch.cummax(torch.tensor(out, dtype=torch.float64), 0).values, snap


@torch.no_grad()
def _kl(model, ids: torch.Tensor, dense_lp: list[torch.Tensor], batch: int) -> float:
    tot, n = 0.0, 0
    for j, b in enumerate(range(0, ids.shape[0], batch)):
        lp = torch.log_softmax(model(input_ids=ids[b:b + batch]).logits.float(), -1)
        tot += float((dense_lp[j].exp() * (dense_lp[j] - lp)).sum())
        n += lp.shape[0] * lp.shape[1]
    return tot / max(n, 1)


@torch.no_grad()
def build_tables(model, adapter, calib_ids: torch.Tensor, gqa: str = "per_group", percdamp: float = 0.01,
                 compensate: bool = True, head_score: str = "grouped", settings: SearchSettings | None = None,
                 device="cpu", batch_size: int = 8, progress=None) -> dict[str, torch.Tensor]:
    """Per decoder layer i: `attn.i` [n_units+1] and `ffn.i` [ffn+1], the estimated cost (KL to dense, or
    relative error with `sensitivity: residual`) of removing k head units / k FFN channels (the last
    entry: the whole block); `raw_attn.i` / `raw_ffn.i` the layer errors, `scale` [L, 2] the calibration.
    Computed on the dense model. With `kl`, one projection at a time is pruned for the calibration
    forwards and then restored: `model` ends unchanged, but no other thread may run it meanwhile (the
    pipeline's steps take turns on a shared model, `tasks.common.step_scope`). One artifact for every
    ratio and budget."""
    from .capture import Accumulator
    from .engine import run_pass
    from .obs import exact_matmul, prepare_hessian

    st = settings or SearchSettings()
    t0 = time.perf_counter()
    dev = torch.device(device)
    out: dict[str, torch.Tensor] = {}
    snaps: dict[tuple[int, str], torch.Tensor] = {}
    resid, refs = {}, {}
    layers = adapter.layers(model)
    L = len(layers)

    class _Tables:  # a consumer of the layer engine: the layer's error curves, its outputs left dense
        def begin(self, step) -> None:
            i, layer = step.index, step.layer
            shape = adapter.layer_shape(model, layer)
            if shape.kind != "decoder":
                return
            grams = Accumulator(torch.float32)
            hooks = {adapter.module_name(adapter.o): grams.gram_hook("attn"),
                     adapter.module_name(adapter.mlp_out): grams.gram_hook("mlp")}
            outs = step.run(hooks=hooks, keep_outputs=True)
            step.outputs = outs
            if outs is not None:
                e = sum(float((o.float() ** 2).sum()) for o in outs)
                resid[i] = e / max(sum(o.shape[0] * o.shape[1] for o in outs), 1)
            for key, lin, kind in (("attn", adapter.o, "attn"), ("mlp", adapter.mlp_out, "ffn")):
                mod = adapter.proj(layer, lin)
                W = mod.weight.data.float().clone()
                H = grams.data[key] * (2.0 / max(grams.rows[key], 1))
                H, _ = prepare_hessian(H, W, percdamp)
                if kind == "attn":
                    curve, snap = head_curve(W, H, shape.n_heads, shape.n_kv_heads, shape.head_dim, gqa,
                                             head_score, compensate, ref=1)
                    ref = 1
                else:
                    ref = max(1, shape.ffn // 4)
                    curve, snap = ffn_curve(W, H, st.ffn_batch, compensate, ref=ref)
                out[f"raw_{kind}.{i}"] = curve
                refs[(i, kind)] = ref
                if snap is not None:
                    snaps[(i, kind)] = snap.to("cpu")
            if progress:
                progress(i + 1, L)

    with exact_matmul():
        run_pass(model, adapter, [_Tables()], calib_ids, device=dev, batch_size=batch_size)
    scale = torch.ones(L, 2, dtype=torch.float64)
    if resolved_sensitivity(st, compensate) == "residual":
        for i in range(L):
            if i in resid:
                scale[i] = 1.0 / (2.0 * max(resid[i], 1e-30))
    else:  # replace-1: the KL of the model with this one sub-block pruned at its reference width
        ids = calib_ids[: st.kl_blocks].to(dev)
        dense = [torch.log_softmax(model(input_ids=ids[b:b + batch_size]).logits.float(), -1)
                 for b in range(0, ids.shape[0], batch_size)]
        for (i, kind), Wp in snaps.items():
            mod = adapter.proj(layers[i], adapter.o if kind == "attn" else adapter.mlp_out)
            keep = mod.weight.data.clone()
            mod.weight.data.copy_(Wp.to(keep.dtype))
            try:
                kl = _kl(model, ids, dense, batch_size)
            finally:
                mod.weight.data.copy_(keep)
            err = float(out[f"raw_{kind}.{i}"][refs[(i, kind)]])
            scale[i, 0 if kind == "attn" else 1] = max(kl, 0.0) / max(err, 1e-30)
            if progress:
                progress(L, L)
    for i in range(L):
        for j, kind in enumerate(("attn", "ffn")):
            if f"raw_{kind}.{i}" in out:
                out[f"{kind}.{i}"] = out[f"raw_{kind}.{i}"] * scale[i, j]
    out["scale"] = scale
    out["seconds"] = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    return out


