"""Capture benchmark (issue 2): peak memory of the layer-wise streamed capture is flat in the
number of layers beyond the weights, and capture time on smollm2-135m relative to one plain
forward pass over the same calibration set.

    .venv/bin/python benchmarks/bench_capture.py [--skip-real]

Each memory measurement runs in a fresh subprocess: peak RSS (ru_maxrss) minus the RSS right
after the model was built (weights + torch runtime).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, torch
from pruning_core import adapter_for, capture_stats, tiny_model
torch.set_num_threads(2)
n_layers, mode = int(sys.argv[1]), sys.argv[2]
m = tiny_model("llama", n_layers=n_layers, hidden_size=256, intermediate_size=1024, num_attention_heads=8,
               num_key_value_heads=4, vocab_size=512)
ids = torch.randint(0, 512, (32, 512), generator=torch.Generator().manual_seed(0))
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
base = rss()
weights = sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20
if mode == "stream":
    capture_stats(m, adapter_for(m), ids, requests={"norms"}, batch_size=8)
else:  # whole-model forward keeping every layer's input (what a naive hook capture holds)
    keep = []
    hs = [l.register_forward_pre_hook(lambda mod, a, kw: keep.append(a[0] if a else kw["hidden_states"]), with_kwargs=True)
          for l in adapter_for(m).layers(m)]
    with torch.no_grad():
        m(input_ids=ids, use_cache=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"layers": n_layers, "weights_mb": weights, "base_mb": base, "peak_over_base_mb": peak - base}))
"""


def memory_table() -> str:
    rows = []
    for n in (8, 16, 32):
        r = {}
        for mode in ("stream", "whole"):
            # fixed mmap threshold: freed large blocks go back to the OS, so peak RSS measures live memory
            # rather than glibc heap fragmentation
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
            out = subprocess.run([sys.executable, "-c", CHILD, str(n), mode], capture_output=True, text=True,
                                 check=True, env=env)
            r[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(f"| {n} | {r['stream']['weights_mb']:.0f} | {r['stream']['peak_over_base_mb']:.0f} | "
                    f"{r['whole']['peak_over_base_mb']:.0f} |")
    head = ("| layers | weights (MiB) | streamed capture: peak RSS over weights (MiB) | whole-model forward "
            "keeping layer inputs (MiB) |\n|---|---|---|---|")
    return head + "\n" + "\n".join(rows)


def real_table(n_samples: int = 32, seq_len: int = 256) -> str:
    import torch

    from pruning_core import adapter_for, calibration_set, capture_stats, load_model

    model, tok = load_model("smollm2-135m", device="cpu")
    ids = calibration_set(tok, n_samples=n_samples, seq_len=seq_len, seed=0)
    with torch.no_grad():
        model(input_ids=ids[:8], use_cache=False)  # warm-up
        t = time.perf_counter()
        for b in range(0, n_samples, 8):
            model.model(input_ids=ids[b:b + 8], use_cache=False)
        fwd = time.perf_counter() - t
    rows = []
    for req in ([], ["attn_gram", "mlp_gram"], ["cosine"]):
        t = time.perf_counter()
        capture_stats(model, adapter_for(model), ids, requests=set(req), batch_size=8)
        dt = time.perf_counter() - t
        rows.append(f"| {'+'.join(req) or 'norms only'} | {dt:.1f} | {dt / fwd:.2f} |")
    return (f"One plain forward pass (decoder only, {n_samples} x {seq_len} tokens, batch 8): {fwd:.1f} s\n\n"
            "| capture requests | seconds | x plain forward |\n|---|---|---|\n" + "\n".join(rows))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-real", action="store_true")
    args = ap.parse_args()
    print("## Capture: peak memory vs depth (tiny Llama, hidden 256, FFN 1024, 32 x 512 tokens, norm statistics)\n")
    print(memory_table())
    if not args.skip_real:
        print("\n## Capture time on smollm2-135m\n")
        print(real_table())


if __name__ == "__main__":
    main()
