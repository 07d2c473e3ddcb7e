"""LoRA recovery on a 30 %-pruned SmolLM2-135M: does it lower perplexity on the evaluation text?

    .venv/bin/python benchmarks/bench_lora.py [--method wanda] [--ratio 0.3] [--steps 30] [--windows 8] [--threads 1]

Prunes heads + FFN channels with a baseline (structured Wanda by default) from 8 x 128 calibration
tokens of the default text's training part, fine-tunes LoRA adapters (rank 8, every linear projection)
on 128-token blocks of the same training part, merges them, saves the merged model and reloads it
with stock `AutoModelForCausalLM.from_pretrained` (a uniform pruned checkpoint). Perplexity: the
fixed-window protocol (non-overlapping 256-token windows of the *evaluation* part, first N windows).
Prints a Markdown table. About 7 min on a busy 2-core machine (1 torch thread).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

SECTION = "lora-recovery"  # run_all.py puts this script's stdout in that section of RESULTS.md

import pruning_core as pc  # noqa: E402
from pruning_core.recover import lora_recover  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench_lora {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--calib", type=int, default=8, help="calibration blocks of 128 tokens")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is ~5x faster than 2 on a shared, oversubscribed 2-core box)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--plot", default=str(Path(__file__).resolve().parent / "plots" / "lora_recovery.png"),
                    help="write the loss curve PNG here ('' for none)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = pc.load_model(a.model, device=a.device)
    dev = next(model.parameters()).device
    ev = pc.eval_tokens(tok)
    ppl = lambda m: pc.perplexity(m, ev, seq_len=256, max_windows=a.windows)["ppl"]  # noqa: E731
    dense = ppl(model)
    log(f"dense PPL {dense:.2f}")
    calib = pc.calibration_set(tok, n_samples=a.calib, seq_len=128, seed=0)
    p_before = pc.count_params(model)
    plan = pc.prune(model, a.method, calib, a.ratio, device=dev)
    p_after = pc.count_params(model)
    pruned = ppl(model)
    log(f"pruned PPL {pruned:.2f} ({p_after / 1e6:.1f} M params)")
    train = pc.calibration_set(tok, n_samples=a.steps * a.batch_size // 2, seq_len=128, seed=1)
    merged, info = lora_recover(model, tok, train, {"steps": a.steps, "lr": a.lr, "rank": a.rank, "alpha": 2 * a.rank,
                                                     "batch_size": a.batch_size, "dropout": 0.0}, progress=True)
    recovered = ppl(merged)
    log(f"recovered PPL {recovered:.2f}; loss {info['loss_curve'][0]:.3f} -> {info['loss_curve'][-1]:.3f}")
    with tempfile.TemporaryDirectory() as d:
        path = pc.save_pruned(merged, tok, plan, Path(d) / "recovered")
        from transformers import AutoModelForCausalLM

        stock = pc.is_uniform(path)
        re_model = (AutoModelForCausalLM.from_pretrained(path) if stock else pc.load_pruned(path)[0]).to(dev).eval()
        reloaded = ppl(re_model)
    curve = info["loss_curve"]
    if a.plot:
        from pruning_core.plots import plot_loss_curves

        plot_loss_curves(curve, a.plot, title=f"LoRA recovery, {a.method} {a.ratio:.0%}")
    k = max(1, len(curve) // 10)
    proto = f"fixed_window_256, first {a.windows} windows of the eval text"
    print(f"### LoRA recovery: {a.model}, {a.method} at {a.ratio:.0%} (heads + FFN), {a.steps} steps\n")
    print(f"PPL protocol: {proto}. LoRA rank {a.rank}, alpha {2 * a.rank}, lr {a.lr}, batch {a.batch_size} x 128 tokens "
          f"of the training text, every linear projection; {info['trainable_params']:,} trainable params, "
          f"{info['seconds']:.0f} s of training on {dev}.\n")
    print("| model | params | PPL |")
    print("|---|---|---|")
    print(f"| dense | {p_before / 1e6:.1f} M | {dense:.2f} |")
    print(f"| pruned ({a.method} {a.ratio:.0%}) | {p_after / 1e6:.1f} M | {pruned:.2f} |")
    print(f"| pruned + LoRA (merged) | {pc.count_params(merged) / 1e6:.1f} M | {recovered:.2f} |")
    print(f"| merged, saved and reloaded ({'stock from_pretrained' if stock else 'load_pruned'}) | "
          f"{pc.count_params(re_model) / 1e6:.1f} M | {reloaded:.2f} |")
    if a.plot:
        print(f"\n![LoRA loss curve]({os.path.relpath(a.plot, Path(__file__).resolve().parent)})")
    print(f"\nTraining loss: mean of first {k} steps {sum(curve[:k]) / k:.3f} -> last {k} steps {sum(curve[-k:]) / k:.3f}. "
          f"Total wall time {time.perf_counter() - t0:.0f} s.")
    return {"dense": dense, "pruned": pruned, "recovered": recovered, "reloaded": reloaded, "loss_curve": curve}


if __name__ == "__main__":
    main()
