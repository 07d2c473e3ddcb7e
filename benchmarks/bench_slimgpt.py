"""SlimGPT against FLAP, structured Wanda and L2 magnitude on the embedded model, at equal parameter budgets.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_slimgpt.py \
        --ratios 0.2,0.1,0.3,0.5 --n-samples 8 --seq-len 128 --ppl-windows 8 --json /tmp/bench_slimgpt.json

Every method removes the same number of parameters from the decoder layers (whole KV groups and FFN
channels; SlimGPT log-increase solves its per-layer ratios for that, the others use the solved uniform
counts), so the rows of one ratio are comparable. Per row: parameters, perplexity (fixed 256-token
windows of the default text's eval split, `metrics.perplexity`), optional offline lm-eval accuracy,
greedy-decode tokens/s, pruning time (also relative to one forward pass of the calibration set
through the dense model) and the pruning step's peak RSS growth. Rows are appended to `--json` as they
finish (a rerun skips rows already there); `--table` prints the Markdown table from that file.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pruning_core.adapters import adapter_for  # noqa: E402
from pruning_core.capture import capture_stats  # noqa: E402
from pruning_core.data import calibration_set, eval_tokens  # noqa: E402
from pruning_core.efficiency import _reset_rss_peak, _status_kb  # noqa: E402
from pruning_core.methods import get_method  # noqa: E402
from pruning_core.metrics import perplexity  # noqa: E402
from pruning_core.models import load_model  # noqa: E402
from pruning_core.plan import LayerPlan, PrunePlan  # noqa: E402
from pruning_core.select import solve_schedule  # noqa: E402
from pruning_core.surgery import apply_plan, count_params  # noqa: E402

VARIANTS = {
    # name: (method, settings)
    "slimgpt": ("slimgpt", {}),
    "slimgpt_uniform": ("slimgpt", {"schedule": "uniform"}),
    "slimgpt_servable": ("slimgpt", {"servable": "vllm"}),  # same heads in every layer, log-increasing FFN
    "flap": ("flap", {}),
    "wanda_sp": ("wanda", {}),
    "l2": ("l2", {}),
    # ablations
    "slimgpt_no_comp": ("slimgpt", {"compensate": False}),
    "slimgpt_naive": ("slimgpt", {"head_score": "naive"}),
    "slimgpt_exact": ("slimgpt", {"head_score": "exact"}),
    "slimgpt_no_dgs": ("slimgpt", {"dynamic_group_size": False}),
    "slimgpt_floor8": ("slimgpt", {"ffn_group_floor": 8}),
    "slimgpt_fp64": ("slimgpt", {"stat_dtype": "float64"}),
    "slimgpt_damp0.1": ("slimgpt", {"percdamp": 0.1}),
    "slimgpt_linear": ("slimgpt", {"schedule": "linear_increase"}),
    "slimgpt_log_dec": ("slimgpt", {"schedule": "log_decrease"}),
    "slimgpt_per_group": ("slimgpt", {"gqa": "per_group"}),
    "flap_al_am": ("flap", {"structure": "al_am"}),
    "flap_no_bias": ("flap", {"bias_compensation": False}),
}


def _counts_plan(model, adapter, scores, sched, name, gqa: str = "kv_group") -> PrunePlan:
    """Keep the highest-scoring units with the same per-layer counts as a solved schedule
    (`solve_schedule(..., gqa=gqa)`): whole KV groups, or with `per_group` the same number of query
    heads in every KV group."""
    lps = []
    for i, layer in enumerate(adapter.layers(model)):
        s = adapter.layer_shape(model, layer)
        rep = s.n_heads // s.n_kv_heads
        lp = LayerPlan(i)
        kh, kf = sched["heads"][i], sched["ffn"][i]
        if kh and gqa == "per_group" and rep > 1:
            g = scores[f"heads.{i}"].double().view(s.n_kv_heads, rep)
            keep = torch.argsort(g, dim=1, descending=True, stable=True)[:, : rep - kh]
            lp.heads = sorted(k * rep + int(j) for k in range(s.n_kv_heads) for j in keep[k])
            lp.kv_heads = list(range(s.n_kv_heads))
        elif kh:
            g = scores[f"heads.{i}"].double().view(s.n_kv_heads, rep).sum(1)
            lp.kv_heads = sorted(torch.argsort(g, descending=True, stable=True)[: s.n_kv_heads - kh].tolist())
            lp.heads = [k * rep + j for k in lp.kv_heads for j in range(rep)]
        if kf:
            lp.ffn = sorted(torch.argsort(scores[f"ffn.{i}"].double(), descending=True, stable=True)[: s.ffn - kf].tolist())
        lps.append(lp)
    return PrunePlan(method=name, settings={}, layers=lps, target_ratio=None)


def _speed(model, tok) -> float:
    from pruning_core.efficiency import measure

    return measure(model, tok, prompt_len=64, new_tokens=16, repeats=1, warmup=0)["decode_tokens_per_s"]


def _lm_eval(model, tok, tasks, limit) -> dict:
    from pruning_core.evaluate import run_lm_eval

    res = run_lm_eval(model, tasks, limit=limit, batch_size=8, tokenizer=tok)["results"]
    return {t: round(float(m.get("acc", float("nan"))), 4) for t, m in res.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratios", default="0.2,0.1,0.3,0.5")
    ap.add_argument("--variants", default="slimgpt,slimgpt_uniform,flap,wanda_sp,l2")
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--lm-eval-limit", type=int, default=0, help="0: no lm-eval")
    ap.add_argument("--tasks", default="pydoc_next_sentence,pydoc_last_word")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--json", default="benchmarks/.bench_slimgpt.json")
    ap.add_argument("--table", action="store_true", help="only print the table from --json (a,b,...)")
    a = ap.parse_args(argv)
    if a.table:  # --json may name several result files (comma-separated); the first dense row is kept
        rows = [r for f in a.json.split(",") if Path(f).exists() for r in json.loads(Path(f).read_text())]
        dense = [r for r in rows if r["variant"] == "dense"][:1]
        print(table(dense + [r for r in rows if r["variant"] != "dense"]))
        return
    path = Path(a.json)
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {(r["variant"], r["ratio"]) for r in rows}
    tasks = [t for t in a.tasks.split(",") if t]

    def save(row):
        rows.append(row)
        path.write_text(json.dumps(rows, indent=1))
        print(json.dumps(row), flush=True)

    model, tok = load_model(a.model, device="cpu")
    adapter = adapter_for(model)
    calib = calibration_set(tok, n_samples=a.n_samples, seq_len=a.seq_len, seed=0)
    ev = eval_tokens(tok)
    if ("dense", 0.0) not in done:
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in range(0, calib.shape[0], 8):
                model(input_ids=calib[b:b + 8], use_cache=False)
        fwd = time.perf_counter() - t0
        row = dict(variant="dense", ratio=0.0, params=count_params(model), calib_fwd_s=fwd,
                   calib=f"{a.n_samples}x{a.seq_len}",
                   ppl=perplexity(model, ev, seq_len=256, max_windows=a.ppl_windows, batch_size=4)["ppl"])
        if not a.no_speed:
            row["tok_s"] = _speed(model, tok)
        if a.lm_eval_limit:
            row["acc"] = _lm_eval(model, tok, tasks, a.lm_eval_limit)
        save(row)
    dense_row = next(r for r in rows if r["variant"] == "dense")
    fwd = dense_row["calib_fwd_s"]
    stats = None
    for ratio in [float(x) for x in a.ratios.split(",")]:
        for v in a.variants.split(","):
            if (v, ratio) in done:
                continue
            meth_name, settings = VARIANTS[v]
            meth = get_method(meth_name)
            m = copy.deepcopy(model)
            _reset_rss_peak()
            rss0 = _status_kb("VmRSS") or 0
            t0 = time.perf_counter()
            if meth.coupled:
                plan = meth.prune(m, adapter, calib, ratio, meth.parse_settings(settings))
            else:
                if stats is None:
                    stats = capture_stats(model, adapter, calib)
                scores = meth.score(model, adapter, stats, meth.parse_settings(settings))
                plan = _counts_plan(m, adapter, scores, solve_schedule(m, adapter, ratio, "uniform"), v)
            prune_s = time.perf_counter() - t0
            peak = max(0, (_status_kb("VmHWM") or rss0) - rss0) / 1024
            apply_plan(m, plan)
            row = dict(variant=v, ratio=ratio, params=count_params(m), prune_s=prune_s, prune_rel=prune_s / fwd,
                       prune_peak_mb=peak,
                       ppl=perplexity(m, ev, seq_len=256, max_windows=a.ppl_windows, batch_size=4)["ppl"])
            if not a.no_speed:
                row["tok_s"] = _speed(m, tok)
            if a.lm_eval_limit:
                row["acc"] = _lm_eval(m, tok, tasks, a.lm_eval_limit)
            if "realised_decoder_ratio" in plan.notes:
                row["decoder_ratio"] = plan.notes["realised_decoder_ratio"]
            save(row)
            del m
    print(table(rows))


def table(rows) -> str:
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    tasks = sorted({t for r in rows for t in (r.get("acc") or {})})
    head = ["ratio", "method", "params (M)", "removed of all", "PPL"] + [f"acc {t}" for t in tasks] + [
        "decode tok/s", "prune s", "prune / calib fwd", "prune peak RSS MB"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(x, f="{:.2f}"):
        return "–" if x is None else f.format(x)

    order = list(VARIANTS)
    for r in sorted(rows, key=lambda r: (r["ratio"], -1 if r["variant"] == "dense" else order.index(r["variant"]))):
        removed = 1 - r["params"] / dense["params"] if dense else None
        cells = [f"{r['ratio']:.0%}", r["variant"], f"{r['params'] / 1e6:.1f}", fmt(removed, "{:.1%}"), fmt(r["ppl"])]
        cells += [fmt((r.get("acc") or {}).get(t), "{:.3f}") for t in tasks]
        cells += [fmt(r.get("tok_s"), "{:.1f}"), fmt(r.get("prune_s"), "{:.0f}"), fmt(r.get("prune_rel"), "{:.1f}x"),
                  fmt(r.get("prune_peak_mb"), "{:.0f}")]
        out.append("| " + " | ".join(cells) + " |")
    if dense:
        out.append(f"\ncalibration {dense.get('calib')} tokens; one dense forward of it: {dense['calib_fwd_s']:.1f} s")
    return "\n".join(out)




def diagnose(argv=None) -> None:
    """Why SlimGPT does or does not beat FLAP: per-layer FFN (down_proj) reconstruction error on
    *held-out* tokens, on the dense model's activations (no propagation), for OBS refit vs FLAP's
    zero + bias, by calibration size and dampening. Run: bench_slimgpt.py diagnose [--layers ...]"""
    from pruning_core import obs
    from pruning_core.methods.flap import channel_metric, flap_bias

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--calib", default="8x128,32x128")
    ap.add_argument("--heldout", default="8x128")
    ap.add_argument("--layers", default="0,6,12,18,24,29")
    ap.add_argument("--damps", default="0.01,0.1")
    a = ap.parse_args(argv)
    model, tok = load_model(a.model, device="cpu")
    adapter = adapter_for(model)
    layers = [int(x) for x in a.layers.split(",")]

    def stats(spec, split, seed):
        n, t = (int(x) for x in spec.split("x"))
        ids = calibration_set(tok, n_samples=n, seq_len=t, seed=seed, split=split)
        return capture_stats(model, adapter, ids, requests={"mlp_gram"})

    held = stats(a.heldout, "eval", 1)
    cal = {c: stats(c, "train", 0) for c in a.calib.split(",")}
    rows = []
    for i in layers:
        W = adapter.proj(adapter.layers(model)[i], adapter.mlp_out).weight.detach().double()
        Gh, sh, nh = held[f"layer.{i}.mlp_gram"].double(), held[f"layer.{i}.mlp_in_sum"].double(), float(held["tokens"])
        base = float((W @ Gh * W).sum())
        T = int(round(W.shape[1] * a.ratio))

        def held_err(W_new, b=None, W=W, Gh=Gh, sh=sh, nh=nh, base=base):
            D = W - W_new
            e = float((D @ Gh * D).sum())
            if b is not None:
                e += -2 * float(b @ (D @ sh)) + nh * float(b @ b)
            return e / base

        for c, st in cal.items():
            G, s, n = st[f"layer.{i}.mlp_gram"].double(), st[f"layer.{i}.mlp_in_sum"].double(), float(st["tokens"])
            mean = s / n
            var = (st[f"layer.{i}.mlp_in_sq"].double() - n * mean * mean) / (n - 1)
            S_flap = torch.argsort(channel_metric("wifv", W, mean, var, None), stable=True)[:T]
            Wf = W.clone()
            Wf[:, S_flap] = 0
            res = {"layer": i, "calib": c, "FLAP zero+bias": held_err(Wf, flap_bias(W, mean, S_flap)),
                   "FLAP mask, OBS refit": None}
            for d in [float(x) for x in a.damps.split(",")]:
                H, _ = obs.prepare_hessian(2 * G / n, None, d)
                Wo = W.clone()
                gone = torch.tensor(obs.prune_columns_batched(Wo, H.clone(), T, obs.dgs_group_sizes(T)))
                res[f"OBS refit d={d}"] = held_err(Wo)
                res[f"OBS refit+bias d={d}"] = held_err(Wo, (W - Wo) @ mean)
                if d == 0.01:
                    Wz = W.clone()
                    Wz[:, gone] = 0
                    res["OBS mask, zero"] = held_err(Wz)
                    Wr = W.clone()
                    obs.obs_prune(Wr, H.clone(), S_flap)
                    res["FLAP mask, OBS refit"] = held_err(Wr)
            rows.append(res)
            print(json.dumps(res), flush=True)
    keys = [k for k in rows[0] if k not in ("layer", "calib")]
    print("\n| layer | calib | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 2))
    for r in rows:
        print(f"| {r['layer']} | {r['calib']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if sys.argv[1:2] == ["diagnose"]:
        diagnose(sys.argv[2:])
    else:
        main()
