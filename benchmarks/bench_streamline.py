"""LLM-Streamline benchmark (issue 6) on smollm2-135m: remove 4, 7 and 10 of 30 layers.

Compared per removed-layer count: ShortGPT (the individually least influential layers), Streamline
`none` (delete the most redundant contiguous block), a LaCo-style collapse of the m = n+1 layer block
into one layer (parameter-difference merge, untrained), `layer` (m = n+1 layers replaced by one trained
decoder layer initialised from the block's first layer) and `ffn` (m = n+1 layers replaced by a trained
residual FFN initialised from that layer's MLP). Reported: fixed-window perplexity on the eval split,
offline lm-eval accuracy (`pydoc_next_sentence`, 4-way multiple choice) and LLM-Streamline's stability
against the dense model, retention versus dense, decode tokens/s and its speed-up, training time.

    .venv/bin/python benchmarks/bench_streamline.py            # prints the Markdown tables
    .venv/bin/python benchmarks/bench_streamline.py --write    # also replaces our section of RESULTS.md

Frugal defaults for a shared 2-core CPU (see --help): 8 x 256 calibration tokens for the cosines,
40 x 128-token training blocks (5 held out), 90 AdamW steps of 4 blocks with cached targets,
8 PPL windows of 256 tokens, 50 lm-eval items.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pruning_core.adapters import adapter_for  # noqa: E402
from pruning_core.capture import capture_stats  # noqa: E402
from pruning_core.data import calibration_set, eval_tokens  # noqa: E402
from pruning_core.methods.streamline import (  # noqa: E402
    StreamlineSettings,
    score,
    select,
    select_shortgpt,
    train_replacement,
)
from pruning_core.metrics import flops_per_token, perplexity  # noqa: E402
from pruning_core.models import load_model  # noqa: E402
from pruning_core.surgery import apply_plan, count_params  # noqa: E402

SECTION = "llm-streamline"
TASK = "pydoc_next_sentence"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def decode_speed(model, prompt: torch.Tensor, new_tokens: int = 24, repeats: int = 2) -> float:
    """Greedy decode tokens/s with the KV cache, batch 1 (best of `repeats`)."""
    model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        out = model.generate(
            prompt,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            use_cache=True,
        )
        dt = time.perf_counter() - t
        best = max(best, (out.shape[1] - prompt.shape[1]) / dt)
    return best


def evaluate_model(model, tok, eval_ids, args) -> dict:
    from pruning_core.evaluate import run_lm_eval

    t = time.perf_counter()
    ppl = perplexity(model, eval_ids, seq_len=256, max_windows=args.ppl_windows)
    res = run_lm_eval(model, [TASK], tokenizer=tok, limit=args.limit, batch_size=8)
    speed = decode_speed(model, eval_ids[:64].unsqueeze(0))
    return {
        "ppl": ppl["ppl"],
        "ppl_protocol": ppl["protocol"],
        "acc": res["results"][TASK].get("acc"),
        "acc_norm": res["results"][TASK].get("acc_norm"),
        "samples": res["samples"][TASK],
        "tokens_per_s": speed,
        "params": count_params(model),
        "flops_per_token": flops_per_token(model, context=256),
        "eval_s": time.perf_counter() - t,
    }


def _norm(samples: list[dict]) -> list[dict]:
    """The same records with acc_norm's correctness (length-normalised choice) as `correct`."""
    return [{**x, "correct": x.get("correct_norm", x["correct"])} for x in samples]


def run(args) -> dict:
    from pruning_core.evaluate import stability

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m", device="cpu")
    ad = adapter_for(model)
    n_layers = len(ad.layers(model))
    calib = calibration_set(tok, n_samples=args.calib, seq_len=256, seed=0, split="train")
    train_ids = calibration_set(tok, n_samples=args.train_blocks, seq_len=128, seed=1, split="train")
    eval_ids = eval_tokens(tok)
    log(f"capture cosines on {calib.numel()} tokens")
    t = time.perf_counter()
    stats = capture_stats(model, ad, calib, requests={"cosine"}, batch_size=4)
    scores = score(model, ad, stats, None)
    capture_s = time.perf_counter() - t
    log("dense evaluation")
    dense = evaluate_model(model, tok, eval_ids, args)
    rows, memo = [], {}
    for n in args.layers:
        for variant in args.variants:
            if variant == "shortgpt":
                plan = select_shortgpt(model, ad, scores, None, {"n_layers": n})
                where = ",".join(str(i) for i in plan.notes["removed_layers"])
            else:
                plan = select(model, ad, scores, None, {"replacement": variant, "n_layers": n})
                a, b = plan.notes["block"]
                where = f"[{a}, {b})" + ("" if variant == "none" else f" -> 1 {variant}")
            key = (variant in ("layer", "ffn"), variant, tuple(lp.keep for lp in plan.layers))
            log(f"n={n} {variant}: {where}")
            pruned = apply_plan(copy.deepcopy(model), plan)
            train = None
            if variant in ("layer", "ffn"):
                s = StreamlineSettings(
                    replacement=variant,
                    n_layers=n,
                    steps=args.steps,
                    batch_size=4,
                    eval_every=max(1, args.steps // 3),
                    cache_targets=True,
                )
                train = train_replacement(model, pruned, plan, train_ids, s)
                log(
                    f"  trained {train['seconds']:.0f} s, val MSE {train['val_mse_before']:.3f} -> "
                    f"{train['val_mse_after']:.3f}"
                )
            if key in memo and train is None:
                m = memo[key]
            else:
                m = evaluate_model(pruned, tok, eval_ids, args)
                memo[key] = m
            row = {
                "n": n,
                "variant": variant,
                "where": where,
                "removed_pct": 100 * (1 - m["params"] / dense["params"]),
                "ppl": m["ppl"],
                "acc": m["acc"],
                "acc_norm": m["acc_norm"],
                "stability": 100 * stability(dense["samples"], m["samples"]),
                "stability_norm": 100 * stability(_norm(dense["samples"]), _norm(m["samples"])),
                "ppl_ret": dense["ppl"] / m["ppl"],
                "acc_ret": m["acc"] / dense["acc"] if dense["acc"] else float("nan"),
                "acc_norm_ret": m["acc_norm"] / dense["acc_norm"] if dense["acc_norm"] else float("nan"),
                "tps": m["tokens_per_s"],
                "speedup": m["tokens_per_s"] / dense["tokens_per_s"],
                "flops_speedup": dense["flops_per_token"] / m["flops_per_token"],
                "train_s": train["seconds"] if train else None,
                "mse": (train["val_mse_before"], train["val_mse_after"]) if train else None,
                "loss_curve": train["loss_curve"] if train else None,
                "val_curve": train["val_curve"] if train else None,
            }
            rows.append(row)
            if args.json:  # partial results survive an interrupted run
                args.json.write_text(
                    json.dumps(
                        {"dense": {k: v for k, v in dense.items() if k != "samples"}, "rows": rows},
                        indent=1,
                        default=str,
                    )
                )
            log(
                f"  ppl {row['ppl']:.2f} acc {row['acc']:.3f} stability {row['stability']:.1f} "
                f"tok/s {row['tps']:.1f}"
            )
            del pruned
    dense_row = {k: v for k, v in dense.items() if k != "samples"}
    return {
        "dense": dense_row,
        "rows": rows,
        "capture_s": capture_s,
        "total_s": time.perf_counter() - t0,
        "cos_block_choice": {
            str(n): int(
                torch.argmax(torch.stack([scores["block_cos"][i, i + n] for i in range(n_layers - n + 1)]))
            )
            for n in args.layers
        },
        "layer_bi": [round(float(x), 4) for x in scores["layer_bi"]],
        "args": vars(args),
    }


def markdown(r: dict, cmd: str) -> str:
    a, d = r["args"], r["dense"]
    out = [
        f"## LLM-Streamline (issue 6): remove {', '.join(str(n) for n in a['layers'])} of 30 layers of smollm2-135m",
        "",
        f"Regenerate: `{cmd}` (total {r['total_s'] / 60:.1f} min on this shared 2-core CPU, "
        f"{a['threads']} torch thread(s)).",
        "",
        f"Setup: cosines from {a['calib']} x 256 calibration tokens (train split); replacements trained on "
        f"{a['train_blocks']} x 128-token train blocks (1/8 held out for validation, best kept), {a['steps']} AdamW "
        "steps of 4 blocks, lr 2e-4 -> 5e-5 cosine, wd 1e-3, clip 5, targets from the frozen dense prefix "
        "(cached per fixed batch). PPL: `fixed_window_256` on the eval split "
        f"({a['ppl_windows']} windows). Accuracy: lm-eval `{TASK}` (0-shot, first {a['limit']} items, acc). "
        "Stability (%): LLM-Streamline's definition, per-item weights softmax(std of the dense model's "
        "per-option mean token loss), agreement of dense and pruned correctness. Retention = pruned/dense "
        "(dense/pruned for PPL). Speed: greedy decode with KV cache, batch 1, 24 new tokens after a 64-token prompt, best of 2 "
        "(noisy on a shared CPU); FLOPs speed-up = dense / pruned forward FLOPs per token (`metrics.flops_per_token`, "
        "256 tokens of context, lm_head included).",
        "",
        f"Dense: PPL {d['ppl']:.2f}, acc {d['acc']:.3f}, acc_norm {d['acc_norm']:.3f}, {d['params'] / 1e6:.1f} M params, "
        f"{d['tokens_per_s']:.1f} tokens/s.",
        "",
        "| removed | method | layers removed / block | params removed (%) | PPL | acc | acc_norm | stability (%) "
        "| stability acc_norm (%) | PPL retention | acc retention | acc_norm retention | tokens/s | speed-up | FLOPs speed-up "
        "| train (s) | val MSE before -> after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {
        "shortgpt": "ShortGPT (BI)",
        "none": "Streamline none",
        "collapse": "LaCo-style collapse",
        "layer": "Streamline layer",
        "ffn": "Streamline FFN",
    }
    for x in r["rows"]:
        mse = f"{x['mse'][0]:.3f} -> {x['mse'][1]:.3f}" if x["mse"] else "-"
        tr = f"{x['train_s']:.0f}" if x["train_s"] is not None else "-"
        out.append(
            f"| {x['n']}/30 | {names[x['variant']]} | {x['where']} | {x['removed_pct']:.1f} | {x['ppl']:.2f} "
            f"| {x['acc']:.3f} | {x['acc_norm']:.3f} | {x['stability']:.1f} | {x['stability_norm']:.1f} "
            f"| {x['ppl_ret']:.3f} | {x['acc_ret']:.3f} | {x['acc_norm_ret']:.3f} | {x['tps']:.1f} "
            f"| {x['speedup']:.2f}x | {x['flops_speedup']:.2f}x | {tr} | {mse} |"
        )
    out += [
        "",
        "ShortGPT per-layer Block Influence (1 - cos(x_l, x_l+1)): "
        + ", ".join(f"{i}:{b:.3f}" for i, b in enumerate(r["layer_bi"])),
        "",
        "Reference-code bugs not reproduced: the replacement is trained with the "
        "real model's causal mask and rotary embeddings, caught from its own forward (upstream: "
        "`attention_mask=None`, i.e. bidirectional attention while training); surgery renumbers every "
        "`layer_idx` 0..L'-1 and training runs with `use_cache=False` (upstream: an extra layer with "
        "`layer_idx=0` sharing layer 0's KV slot); the cosine schedule decays per optimiser step to its floor; "
        "the best weights are copied, not referenced; the block score uses the pre-final-norm last state; "
        "stability sums the weights of the items that agree (upstream: the first M weights in file order).",
    ]
    return "\n".join(out)


def write_section(md: str, path: Path) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"<!-- BEGIN {SECTION} -->\n{md}\n<!-- END {SECTION} -->"
    pat = re.compile(rf"<!-- BEGIN {re.escape(SECTION)} -->.*?<!-- END {re.escape(SECTION)} -->", re.S)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[4, 7, 10])
    p.add_argument(
        "--variants",
        nargs="+",
        default=["shortgpt", "none", "collapse", "layer", "ffn"],
        choices=["shortgpt", "none", "collapse", "layer", "ffn"],
    )
    p.add_argument("--steps", type=int, default=90)
    p.add_argument("--calib", type=int, default=8)
    p.add_argument("--train-blocks", type=int, default=40)
    p.add_argument("--ppl-windows", type=int, default=8)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy shared CPU)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--write", action="store_true", help=f"replace the {SECTION} section of benchmarks/RESULTS.md"
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    r = run(args)
    cmd = "PYTHONPATH=. .venv/bin/python benchmarks/bench_streamline.py " + " ".join(sys.argv[1:])
    if args.json:
        args.json.write_text(json.dumps(r, indent=1, default=str))
    md = markdown(r, cmd.strip())
    print(md)
    if args.write:
        write_section(md, ROOT / "benchmarks" / "RESULTS.md")


if __name__ == "__main__":
    main()
