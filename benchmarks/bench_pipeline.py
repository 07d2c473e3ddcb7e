"""Pipeline cache benchmark: the same spec run twice through `pruneflow run` (each a fresh process,
Prefect ephemeral mode); prints per-step seconds and cache hit/miss of both runs, and wall times.

    .venv/bin/python benchmarks/bench_pipeline.py            # the embedded default (smollm2-135m), minutes
    .venv/bin/python benchmarks/bench_pipeline.py --tiny     # a tiny random Llama, seconds
    .venv/bin/python benchmarks/bench_pipeline.py --home /tmp/pf   # keep the state folder

By default a fresh temporary PRUNEFLOW_HOME is used (the embedded model is converted there once,
outside the timed runs), so the first run is a true cold cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def tiny_model(folder: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pruning_core.data import load_text

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([load_text("pydoc", "train")[:60_000]], trainer=trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<eos>"], show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=fast.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--home", default=None)
    args = ap.parse_args()
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="pf-bench-"))
    env = {**os.environ, "PRUNEFLOW_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "flows.cli", "run", "--quiet", "--json", "--set", "tracking.enabled=false",
           "--name", "bench"]
    if args.tiny:
        model = tiny_model(home / "tiny-model")
        cmd += ["--model", str(model), "--set", "calibration.n_samples=8", "--set", "calibration.seq_len=64",
                "--set", "evaluation.ppl_seq_len=64", "--set", "evaluation.ppl_windows=4"]
    else:  # convert the embedded model outside the timed runs
        os.environ["PRUNEFLOW_HOME"] = str(home)
        from pruning_core.models import embedded_path

        embedded_path("smollm2-135m")
    reports, walls = [], []
    for _ in range(2):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        if p.returncode != 0:
            sys.exit(p.stderr[-3000:])
        reports.append(json.loads((home / "runs" / "bench" / "report.json").read_text()))
    a, b = reports
    model = "tiny random Llama (2 layers)" if args.tiny else "smollm2-135m"
    print(f"### Two consecutive `pruneflow run` ({model}, {a['method']} @ {a['target_ratio']}, CPU)\n")
    print("| step | run 1 cache | run 1 s | run 2 cache | run 2 s |")
    print("|---|---|---|---|---|")
    for s in a["cache"]:
        print(f"| {s} | {a['cache'][s]} | {a['timings'][s]:.2f} | {b['cache'][s]} | {b['timings'][s]:.2f} |")
    print(f"| **process wall time** | | **{walls[0]:.1f}** | | **{walls[1]:.1f}** |")
    print(f"\nsecond / first wall time: {walls[1] / walls[0]:.3f}; "
          f"steps only: {sum(b['timings'].values()) / max(1e-9, sum(a['timings'].values())):.4f}")
    if not args.home:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
