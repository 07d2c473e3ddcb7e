"""LLM-Rank on smollm2-135m: FFN-channel pruning with LLMRank (gamma 0 / 0.5 / 0.9, isolated and
chained) against the baselines, at 10/20/30/40 % of the FFN channels of every layer.

Score once, prune many: the calibration statistics are captured once, every method scores once,
and each ratio is a selection + physical surgery on a copy of the dense model. Reported: fixed-window
perplexity on the evaluation split (few windows on CPU; the protocol is named), its retention
(dense PPL / pruned PPL), parameters, forward tokens/s (one per ratio: every method removes the
same number of channels per layer, so the shapes are identical), the scoring time relative to one
plain forward pass over the calibration set, and (optional, `--lm-eval-limit N`) the offline lm-eval
tasks at one ratio.

    .venv/bin/python benchmarks/bench_llmrank.py [--windows 2] [--calib 8x128] [--lm-eval-limit 0]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pruning_core.adapters import adapter_for  # noqa: E402
from pruning_core.capture import capture_stats  # noqa: E402
from pruning_core.checkpoint import load_pruned, save_pruned  # noqa: E402
from pruning_core.data import calibration_set, eval_tokens  # noqa: E402
from pruning_core.methods import get_method  # noqa: E402
from pruning_core.metrics import flops_per_token, perplexity  # noqa: E402
from pruning_core.models import load_model  # noqa: E402
from pruning_core.surgery import apply_plan, count_params  # noqa: E402

RATIOS = (0.1, 0.2, 0.3, 0.4)
CONFIGS = [  # (label, method, settings); llm-rank's defaults are gamma 0.5, isolated, node=down_in
    ("llm-rank γ=0, node=up (= activation of up_proj)", "llm-rank", {"gamma": 0.0, "node": "up"}),
    ("llm-rank γ=0.5 isolated, node=up", "llm-rank", {"gamma": 0.5, "pipeline": "isolated", "node": "up"}),
    ("llm-rank γ=0.5 chained, node=up", "llm-rank", {"gamma": 0.5, "pipeline": "chained", "node": "up"}),
    ("llm-rank γ=0.9 isolated, node=up", "llm-rank", {"gamma": 0.9, "pipeline": "isolated", "node": "up"}),
    ("llm-rank γ=0.9 chained, node=up", "llm-rank", {"gamma": 0.9, "pipeline": "chained", "node": "up"}),
    (
        "llm-rank γ=0.5 isolated, node=down_in (default)",
        "llm-rank",
        {"gamma": 0.5, "pipeline": "isolated", "node": "down_in"},
    ),
    (
        "llm-rank γ=0.5 chained, node=down_in",
        "llm-rank",
        {"gamma": 0.5, "pipeline": "chained", "node": "down_in"},
    ),
    (
        "llm-rank γ=0.9 isolated, node=down_in",
        "llm-rank",
        {"gamma": 0.9, "pipeline": "isolated", "node": "down_in"},
    ),
    ("mpr chained, node=up", "mpr", {"pipeline": "chained", "node": "up"}),
    ("random", "random", {"targets": ["ffn"]}),
    ("l1", "l1", {"targets": ["ffn"]}),
    ("activation (down_proj input = llm-rank γ=0, node=down_in)", "activation", {"targets": ["ffn"]}),
    ("wanda (structured)", "wanda", {"targets": ["ffn"]}),
]


def say(*a):
    print(*a, flush=True)


@torch.no_grad()
def tokens_per_s(model, n_tokens: int = 256) -> float:
    x = torch.randint(0, 1000, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    model(input_ids=x, use_cache=False)
    return n_tokens / (time.perf_counter() - t)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=2, help="PPL windows of 256 tokens")
    ap.add_argument("--calib", default="8x128", help="calibration blocks NxL")
    ap.add_argument("--ratios", type=float, nargs="+", default=list(RATIOS))
    ap.add_argument("--lm-eval-limit", type=int, default=0, help="samples per offline lm-eval task (0: skip)")
    ap.add_argument("--lm-eval-ratio", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--only", nargs="+", default=None, help="run only the methods whose label contains one of these"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    model, tok = load_model(args.model, device="cpu")
    adapter = adapter_for(model)
    n, seq = (int(v) for v in args.calib.split("x"))
    calib = calibration_set(tok, n_samples=n, seq_len=seq, seed=0)
    ev = eval_tokens(tok)

    with torch.no_grad():
        t = time.perf_counter()
        model(input_ids=calib, use_cache=False)
        t_fwd = time.perf_counter() - t
    t = time.perf_counter()
    stats = capture_stats(model, adapter, calib, batch_size=n)
    t_cap = time.perf_counter() - t
    dense_ppl = perplexity(model, ev, seq_len=256, max_windows=args.windows)
    dense_params = count_params(model)
    speed = {0.0: tokens_per_s(model)}
    flops = {0.0: flops_per_token(model)}
    say(f"## LLM-Rank on {args.model}: FFN channels removed in every layer\n")
    say(
        f"Calibration: {n} x {seq} tokens of the pydoc train split; PPL protocol {dense_ppl['protocol']}, "
        f"{dense_ppl['windows']} windows ({dense_ppl['tokens']} predicted tokens) of the eval split, CPU fp32, "
        f"{args.threads} threads on a shared 2-core machine (timings are noisy).\n"
    )
    say(
        f"One plain forward pass over the calibration set: {t_fwd:.2f} s; streamed capture of the statistics: "
        f"{t_cap:.2f} s. Dense: PPL {dense_ppl['ppl']:.2f}, {dense_params / 1e6:.2f} M params.\n"
    )
    say(
        "| method | score time (s) | score / calib fwd | "
        + " | ".join(f"PPL {int(r * 100)} %" for r in args.ratios)
        + " | mean PPL retention (%) |"
    )
    say("|---|---|---|" + "---|" * (len(args.ratios) + 1))
    params: dict[float, int] = {}
    ppl: dict[str, dict[float, float]] = {}
    plans = {}
    configs = [c for c in CONFIGS if args.only is None or any(o in c[0] for o in args.only)]
    for label, name, raw in configs:
        m = get_method(name)
        st = m.parse_settings(raw)
        t = time.perf_counter()
        scores = m.score(model, adapter, stats, st)
        t_score = time.perf_counter() - t
        ppl[label] = {}
        for r in args.ratios:
            plan = m.select(model, adapter, scores, r, st)
            pruned = apply_plan(copy.deepcopy(model), plan)
            params[r] = count_params(pruned)
            ppl[label][r] = perplexity(pruned, ev, seq_len=256, max_windows=args.windows)["ppl"]
            if r not in speed:
                speed[r] = tokens_per_s(pruned)
                flops[r] = flops_per_token(pruned)
            plans[(label, r)] = plan
            del pruned
        ret = sum(dense_ppl["ppl"] / ppl[label][r] for r in args.ratios) / len(args.ratios)
        say(
            f"| {label} | {t_score:.3f} | {t_score / t_fwd:.3f} | "
            + " | ".join(f"{ppl[label][r]:.2f}" for r in args.ratios)
            + f" | {100 * ret:.1f} |"
        )

    say("\n| ratio | params (M) | removed of all params (%) | GFLOPs / token | forward tokens/s (1 x 256) |")
    say("|---|---|---|---|---|")
    say(f"| dense | {dense_params / 1e6:.2f} | 0.0 | {flops[0.0] / 1e9:.3f} | {speed[0.0]:.0f} |")
    for r in args.ratios:
        say(
            f"| {int(r * 100)} % | {params[r] / 1e6:.2f} | {100 * (1 - params[r] / dense_params):.1f} | "
            f"{flops[r] / 1e9:.3f} | {speed[r]:.0f} |"
        )

    # physically smaller and reloads: save -> load -> identical logits
    label = configs[0][0]
    r = 0.3 if 0.3 in args.ratios else args.ratios[-1]
    pruned = apply_plan(copy.deepcopy(model), plans[(label, r)])
    x = ev[:64].view(1, -1)
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        save_pruned(pruned, tok, plans[(label, r)], Path(d) / "ck")
        size = sum(f.stat().st_size for f in (Path(d) / "ck").glob("*.safetensors"))
        again, _ = load_pruned(Path(d) / "ck")
        same = torch.equal(again(input_ids=x).logits, pruned(input_ids=x).logits)
    say(
        f"\nReload check ({label}, {int(r * 100)} %): safetensors {size / 2**20:.0f} MiB, "
        f"{count_params(again) / 1e6:.2f} M params, logits identical after save -> load: {same}."
    )

    if args.lm_eval_limit > 0:
        from pruning_core.evaluate import offline_tasks, run_lm_eval

        tasks = offline_tasks()
        tasks = [t for t in tasks if "rolling" not in t]
        r = args.lm_eval_ratio
        say(
            f"\n### offline lm-eval tasks at {int(r * 100)} % (limit {args.lm_eval_limit} samples per task, 0-shot)\n"
        )
        say("| method | " + " | ".join(f"{t} acc" for t in tasks) + " | mean retention (%) |")
        say("|---|" + "---|" * (len(tasks) + 1))
        dense = run_lm_eval(model, tasks, limit=args.lm_eval_limit, tokenizer=tok, batch_size=8)["results"]
        say(
            "| dense | "
            + " | ".join(f"{dense[t].get('acc', float('nan')):.3f}" for t in tasks)
            + " | 100.0 |"
        )
        for label, _name, _raw in configs:
            if (label, r) not in plans:
                continue
            pruned = apply_plan(copy.deepcopy(model), plans[(label, r)])
            res = run_lm_eval(pruned, tasks, limit=args.lm_eval_limit, tokenizer=tok, batch_size=8)["results"]
            rets = [res[t]["acc"] / dense[t]["acc"] for t in tasks if dense[t].get("acc")]
            say(
                f"| {label} | "
                + " | ".join(f"{res[t].get('acc', float('nan')):.3f}" for t in tasks)
                + f" | {100 * sum(rets) / max(1, len(rets)):.1f} |"
            )
            del pruned
    say(f"\n_Total {time.perf_counter() - t_all:.0f} s._")


if __name__ == "__main__":
    main()
