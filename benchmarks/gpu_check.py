"""GPU check of the layer engine: an 8B-shaped random bf16 Llama through SlimGPT and Wanda under
`placement: device` and `offload`, on CUDA. Uses pruning_core only (no Prefect, MLflow, tokenizer or
embedded model). Prints, per (method, placement) and step: seconds, peak GPU memory
(torch.cuda.max_memory_allocated, reset before each step) and peak host RSS (VmHWM, reset before
each step through /proc/self/clear_refs; the process's ru_maxrss where that is not possible).

    PYTHONPATH=. python3 benchmarks/gpu_check.py                        # CUDA, 8B shape, 4 layers
    PYTHONPATH=. python3 benchmarks/gpu_check.py --device cpu --shape tiny --layers 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2),
}


def write_model(folder: Path, shape: str, n_layers: int, vocab: int, device: str) -> int:
    """A random bf16 Llama checkpoint, one decoder layer per safetensors shard; returns weight bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(vocab_size=vocab, num_hidden_layers=n_layers, max_position_embeddings=4096,
                      tie_word_embeddings=False, rms_norm_eps=1e-5, dtype="bfloat16", **SHAPES[shape])
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(folder)
    g = torch.Generator(device=device).manual_seed(0)
    h, f = cfg.hidden_size, cfg.intermediate_size
    hd = h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd

    def rnd(*s):
        return (torch.randn(*s, generator=g, device=device) / s[-1] ** 0.5).to(torch.bfloat16).cpu()

    ones = torch.ones(h, dtype=torch.bfloat16)
    pieces = [{"model.embed_tokens.weight": rnd(vocab, h), "lm_head.weight": rnd(vocab, h), "model.norm.weight": ones}]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        pieces.append(lambda p=p: {
            p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
            p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
            p + "mlp.gate_proj.weight": rnd(f, h), p + "mlp.up_proj.weight": rnd(f, h),
            p + "mlp.down_proj.weight": rnd(h, f), p + "input_layernorm.weight": ones.clone(),
            p + "post_attention_layernorm.weight": ones.clone()})
    wm, total = {}, 0
    for j, t in enumerate(pieces):
        t = t() if callable(t) else t
        name = f"model-{j + 1:05d}-of-{len(pieces):05d}.safetensors"
        save_file(t, str(folder / name), metadata={"format": "pt"})
        wm.update({k: name for k in t})
        total += sum(v.numel() * v.element_size() for v in t.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wm}))
    return total


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peaks(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peaks(cuda: bool) -> tuple[float, float]:
    """(peak GPU GiB, peak host RSS GiB) since `reset_peaks`."""
    gpu = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    hwm = _status_kb("VmHWM")
    host = (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 2**20
    return gpu, host


def run_case(ckpt: Path, out: Path, method: str, placement: str, a) -> list[dict]:
    from pruning_core import adapter_for, capture_stats
    from pruning_core.checkpoint import save_streaming
    from pruning_core.loading import open_model
    from pruning_core.methods import get_method
    from pruning_core.metrics import perplexity

    cuda = a.device.startswith("cuda")
    rows = []
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, a.vocab, (a.n_samples, a.seq_len), generator=g)
    ev = torch.randint(0, a.vocab, (a.ppl_windows * a.seq_len,), generator=g)
    state: dict = {}

    def step(name, fn):
        reset_peaks(cuda)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        gpu, host = peaks(cuda)
        rows.append({"method": method, "placement": placement, "step": name, "seconds": dt, "gpu_gib": gpu,
                     "host_gib": host})
        print(f"{method:8s} {placement:8s} {name:10s} {dt:8.2f} s  GPU {gpu:7.2f} GiB  host {host:7.2f} GiB",
              flush=True)

    def load():
        state["m"], _ = open_model(ckpt, placement=placement, device=a.device, dtype="bfloat16", with_tokenizer=False)

    def prune():
        m = state["m"]
        ad = adapter_for(m)
        meth = get_method(method)
        st = meth.parse_settings({"gqa": "per_group"} if method == "wanda" else {})
        if meth.coupled:
            state["plan"] = meth.prune(m, ad, calib, a.ratio, st, device=a.device)
        else:
            stats = capture_stats(m, ad, calib, requests=set(meth.needs) | {"norms"}, device=a.device,
                                  batch_size=a.batch_size)
            state["plan"] = meth.select(m, ad, meth.score(m, ad, stats, st), a.ratio, st)

    def save():
        save_streaming(state.pop("m"), None, state["plan"], out / f"{method}-{placement}")

    def evaluate():
        m, _ = open_model(out / f"{method}-{placement}", placement=placement, device=a.device, dtype="bfloat16",
                          with_tokenizer=False)
        state["ppl"] = perplexity(m, ev, seq_len=a.seq_len, batch_size=a.batch_size, device=a.device)["ppl"]

    for name, fn in (("load", load), ("prune", prune), ("save", save), ("evaluate", evaluate)):
        step(name, fn)
    rows[-1]["ppl"] = state["ppl"]
    shutil.rmtree(out / f"{method}-{placement}", ignore_errors=True)
    if cuda:
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--methods", nargs="+", default=["slimgpt", "wanda"])
    ap.add_argument("--placements", nargs="+", default=["device", "offload"])
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available: use --device cpu for a smoke test", file=sys.stderr)
        return 2
    if a.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="pf-gpucheck-", dir=a.workdir))
    try:
        t0 = time.perf_counter()
        nbytes = write_model(work / "dense", a.shape, a.layers, a.vocab, a.device if a.device.startswith("cuda") else "cpu")
        print(f"checkpoint: {a.shape} x {a.layers} layers, {nbytes / 2**30:.2f} GiB bf16, written in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        rows = []
        for method in a.methods:
            for placement in a.placements:
                rows += run_case(work / "dense", work, method, placement, a)
        print("\n| method | placement | step | seconds | peak GPU GiB | peak host RSS GiB |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {r['placement']} | {r['step']} | {r['seconds']:.2f} | {r['gpu_gib']:.2f} | "
                  f"{r['host_gib']:.2f} |")
        ppl = {(r["method"], r["placement"]): r["ppl"] for r in rows if "ppl" in r}
        for (method, placement), v in ppl.items():
            ref = ppl.get((method, "device"))
            same = "" if ref is None or placement == "device" else f"  (== device: {v == ref})"
            print(f"ppl {method} {placement}: {v!r}{same}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
