"""Memory and time of `pruneflow run` on random-weight Llamas of growing depth, per placement.

Every configuration is one `pruneflow run` in a subprocess (its own PRUNEFLOW_HOME, tracking off);
the peak RSS of its whole process tree is sampled every 50 ms (psutil) and the kernel's own
per-process maximum (ru_maxrss of the children) is printed beside it. Checkpoints are written with
random bf16 weights shard by shard (one decoder layer per shard), so a checkpoint larger than this
machine's memory is never held in memory; the tokenizer is SmolLM2's (vocab 49152).

    # 4 -> 16 layers, hidden 1536 / FFN 6144 / 12 q / 4 kv heads, bf16 (the issue's must-show)
    python benchmarks/bench_scale.py growth --layers 4 16 --placements disk device
    # 8B-shaped layers (hidden 4096 / FFN 14336 / 32 q / 8 kv), 2, 4, 8 layers, four methods
    python benchmarks/bench_scale.py matrix --layers 2 4 8 --methods wanda llm-rank slimgpt llm-streamline
    # one checkpoint larger than memory, pruned with wanda and llm-rank under placement=disk
    python benchmarks/bench_scale.py big --layers 58 --methods wanda llm-rank --delete
    # the layer engine (issue 22): prune + evaluate in-process under offload and disk, this tree against
    # an older checkout (e.g. `git worktree add /tmp/old56 56b0293`), with the bytes read from weight files
    python benchmarks/bench_scale.py engine --layers 4 --before-root /tmp/old56
    # the same where the checkpoint does not fit in the page cache (a model larger than RAM, which is what
    # `disk` is for): each worker in a memory cgroup of 3 GiB (page cache included), the spec's 16 windows
    python benchmarks/bench_scale.py engine --layers 8 --placements disk --ppl-windows 16 \
        --memory-limit-gb 3 --before-root /tmp/old56
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

import psutil

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "1536": dict(hidden_size=1536, intermediate_size=6144, num_attention_heads=12, num_key_value_heads=4),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
}


def write_random_llama(folder: Path, shape: str, n_layers: int, seed: int = 0) -> int:
    """A random bf16 Llama checkpoint written one decoder layer per shard; returns its weight bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from pruning_core.models import embedded_path

    folder.mkdir(parents=True, exist_ok=True)
    tok_src = embedded_path("smollm2-135m")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_src / f, folder / f)
    cfg = LlamaConfig(vocab_size=49152, num_hidden_layers=n_layers, max_position_embeddings=4096,
                      tie_word_embeddings=False, rms_norm_eps=1e-5, dtype="bfloat16", **SHAPES[shape])
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)
    h, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    # one bank of N(0, 1) values; every tensor is a window at a random offset, scaled by 1/sqrt(fan_in)
    # (drawing 26 GB of normals on two cores would take longer than the benchmark itself)
    bank = torch.randn(max(cfg.vocab_size * h, f * h) + 2**20, generator=g).to(torch.bfloat16)

    def rnd(*s):
        n = s[0] * s[1]
        off = int(torch.randint(0, bank.numel() - n + 1, (1,), generator=g))
        return (bank[off:off + n].view(*s) * (1.0 / s[-1] ** 0.5)).to(torch.bfloat16)

    shards = []
    n_files = n_layers + 1
    total = 0
    other = {"model.embed_tokens.weight": rnd(cfg.vocab_size, h), "lm_head.weight": rnd(cfg.vocab_size, h),
             "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    pieces = [other] + [None] * n_layers
    for i in range(n_files):
        t = pieces[i]
        if t is None:
            p = f"model.layers.{i - 1}."
            t = {p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
                 p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
                 p + "mlp.gate_proj.weight": rnd(f, h), p + "mlp.up_proj.weight": rnd(f, h),
                 p + "mlp.down_proj.weight": rnd(h, f),
                 p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                 p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        name = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        save_file(t, str(folder / name), metadata={"format": "pt"})
        shards.append((name, list(t)))
        total += sum(v.numel() * v.element_size() for v in t.values())
        del t
        pieces[i] = None
    wm = {k: n for n, ks in shards for k in ks}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=1))
    return total


def run_cli(args: list[str], home: Path, env_extra: dict | None = None) -> dict:
    """`pruneflow run ...` under /usr/bin/time: rc, seconds, the peak RSS of the pruneflow process
    (the kernel's ru_maxrss, what `time -v` calls "Maximum resident set size"), the sampled peak sum
    over its process tree (it counts the pages a fork shares twice), and the run's report."""
    env = {**os.environ, "PRUNEFLOW_HOME": str(home), "PRUNEFLOW_QUIET": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", **(env_extra or {})}
    exe = str(Path(sys.executable).parent / "pruneflow")
    home.mkdir(parents=True, exist_ok=True)
    tfile = home / "time.txt"
    t0 = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", str(tfile), exe, "run", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    out = proc.stdout.read()
    dt = time.perf_counter() - t0
    try:
        maxrss = int(tfile.read_text().strip().splitlines()[-1]) * 1024
    except (OSError, ValueError, IndexError):
        maxrss = None
    report = None
    runs = sorted((home / "runs").glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    if runs:
        report = json.loads(runs[-1].read_text())
    return {"rc": proc.returncode, "seconds": dt, "peak_tree_rss": peak, "max_rss": maxrss, "report": report,
            "output": out[-3000:]}


def base_args(model: Path, method: str, placement: str, a) -> list[str]:
    sets = {
        # the default spec carries wanda's settings: start every method from its own defaults
        "method.settings": "{}",
        "model.dtype": a.dtype, "model.placement": placement, "method.name": method, "ratio": a.ratio,
        "calibration.n_samples": a.n_samples, "calibration.seq_len": a.seq_len, "calibration.batch_size": a.n_samples,
        "evaluation.ppl_windows": a.ppl_windows, "evaluation.ppl_seq_len": a.seq_len,
        "evaluation.batch_size": a.ppl_windows, "tracking.enabled": "false", "device": a.device,
    }
    if a.tasks:
        sets["evaluation.tasks"] = "[" + ",".join(a.tasks) + "]"
        sets["evaluation.limit"] = a.limit
    else:
        sets["evaluation.tasks"] = "[]"
    if method == "llm-streamline":  # the replacement trained in the recover step (pruned model + dense block)
        sets["method.settings.steps"] = a.streamline_steps
        sets["method.settings.replacement"] = "layer"
        sets["recovery.kind"] = "replacement"
    if method in ("wanda", "l2"):
        sets["method.settings.gqa"] = "per_group"
    out = ["--model", str(model)]
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


def engine_worker(a) -> None:
    """One in-process run (the code under `--root`, imported through PYTHONPATH): open the dense model
    under `--placements[0]`, capture + score + select (wanda), save the pruned checkpoint streaming,
    open it and take its perplexity. Per step: seconds, peak RSS (VmHWM, reset through clear_refs),
    bytes of decoder-layer tensors the weight-file reader returned (`TensorFiles.read`, counted by a wrapper) and the bytes the
    process read from storage (/proc/self/io read_bytes; 0 when the files sit in the page cache)."""
    import torch

    from pruning_core import adapter_for, capture_stats
    from pruning_core.methods import get_method
    from pruning_core.metrics import perplexity

    try:  # placement.py was split (issue 22B); the code before the split has it all in one module
        from pruning_core import weightfiles as files
        from pruning_core.checkpoint import save_streaming
        from pruning_core.loading import open_model
    except ImportError:
        from pruning_core import placement as files

        open_model, save_streaming = files.open_model, files.save_streaming

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    counted = {"bytes": 0}
    real_read = files.TensorFiles.read

    def read(self, names):
        out = real_read(self, names)
        counted["bytes"] += sum(t.numel() * t.element_size() for k, t in out.items() if ".layers." in k)
        return out

    files.TensorFiles.read = read

    def io_read() -> int:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
        return 0

    def hwm() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    pl, ckpt = a.placements[0], Path(a.ckpt)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 49152, (a.n_samples, a.seq_len), generator=g)
    ev = torch.randint(0, 49152, (a.ppl_windows * a.ppl_seq_len,), generator=g)
    meth = get_method("wanda")
    st = meth.parse_settings({"gqa": "per_group"})
    state, steps = {}, []

    def load():
        state["m"], _ = open_model(ckpt, placement=pl, device=a.device, dtype=a.dtype, with_tokenizer=False)

    def capture():
        state["stats"] = capture_stats(state["m"], adapter_for(state["m"]), calib, requests={"norms"},
                                       device=a.device, batch_size=a.n_samples)

    def prune():
        m = state["m"]
        ad = adapter_for(m)
        plan = meth.select(m, ad, meth.score(m, ad, state.pop("stats"), st), a.ratio, st)
        save_streaming(state.pop("m"), None, plan, Path(a.out))

    def evaluate():
        m, _ = open_model(Path(a.out), placement=pl, device=a.device, dtype=a.dtype, with_tokenizer=False)
        state["ppl"] = perplexity(m, ev, seq_len=a.ppl_seq_len, batch_size=a.eval_batch)["ppl"]

    for name, fn in (("load", load), ("capture", capture), ("prune", prune), ("evaluate", evaluate)):
        Path("/proc/self/clear_refs").write_text("5")
        b0, r0, t0 = counted["bytes"], io_read(), time.perf_counter()
        fn()
        steps.append({"step": name, "seconds": time.perf_counter() - t0, "peak_rss": hwm(),
                      "weight_bytes_read": counted["bytes"] - b0, "io_read_bytes": io_read() - r0})
    print("RESULT " + json.dumps({"steps": steps, "ppl": state["ppl"]}), flush=True)


def evict(folder: Path) -> None:
    """Drop `folder`'s files from the page cache (posix_fadvise DONTNEED after a sync), so that the next reader
    starts cold and its page cache is charged to its own memory cgroup."""
    os.sync()
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def memory_cgroup(limit_bytes: int) -> Path:
    """A new memory cgroup (v2, else v1) limited to `limit_bytes`. The kernel charges a cgroup's page cache
    to its limit, so a checkpoint larger than the limit cannot stay cached: every re-read reaches storage,
    as on a machine whose RAM is smaller than the model. Needs write access to /sys/fs/cgroup."""
    name = f"pruneflow-bench-{os.getpid()}"
    try:
        if Path("/sys/fs/cgroup/cgroup.controllers").exists():
            cg = Path("/sys/fs/cgroup") / name
            cg.mkdir()
            (cg / "memory.max").write_text(str(limit_bytes))
        else:
            cg = Path("/sys/fs/cgroup/memory") / name
            cg.mkdir()
            (cg / "memory.limit_in_bytes").write_text(str(limit_bytes))
    except OSError as e:
        sys.exit(f"--memory-limit-gb: cannot create a memory cgroup here ({e}); run without it")
    return cg


def engine_mode(a, work: Path, n_layers: int) -> None:
    """Before / after table of the layer engine: `engine_worker` once per (code, placement)."""
    ckpt = work / f"llama-8b-{n_layers}L"
    if not (ckpt / "config.json").exists():
        write_random_llama(ckpt, "8b", n_layers)
    size = json.loads((ckpt / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    print("(the pruned checkpoint's decoder layers are what `evaluate` reads: once per evaluation is their size)")
    roots = ([("before", Path(a.before_root))] if a.before_root else []) + [("after", ROOT)]
    rows = []
    cg = memory_cgroup(int(a.memory_limit_gb * 2**30)) if a.memory_limit_gb else None
    if cg:
        procs = cg / "cgroup.procs"

        def join():  # runs in the child before exec: the worker and its page cache belong to the cgroup
            procs.write_text(str(os.getpid()))
        print(f"each worker runs in memory cgroup {cg} limited to {a.memory_limit_gb} GiB (page cache included); "
              "the dense checkpoint is evicted from the page cache before each worker", flush=True)
    print(f"# bench_scale engine: 8B-shaped x {n_layers} layers ({size / 2**30:.2f} GiB {a.dtype}), wanda {a.ratio}, "
          f"calibration {a.n_samples}x{a.seq_len}, ppl {a.ppl_windows}x{a.ppl_seq_len} eval batch {a.eval_batch}, "
          f"device {a.device}", flush=True)
    for pl in a.placements or ["offload", "disk"]:
        for label, root in roots:
            out = work / f"pruned-{label}-{pl}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "_worker", "--ckpt", str(ckpt),
                   "--out", str(out), "--placements", pl, "--device", a.device, "--dtype", a.dtype,
                   "--ratio", str(a.ratio), "--n-samples", str(a.n_samples), "--seq-len", str(a.seq_len),
                   "--ppl-windows", str(a.ppl_windows), "--ppl-seq-len", str(a.ppl_seq_len),
                   "--eval-batch", str(a.eval_batch)]
            env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
            if cg:
                evict(ckpt)
            t0 = time.perf_counter()
            p = subprocess.run(cmd, env=env, cwd=str(root), capture_output=True, text=True, preexec_fn=join if cg else None)
            wall = time.perf_counter() - t0
            res = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            if p.returncode or not res:
                print(f"{label} {pl} failed (rc {p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}", flush=True)
                continue
            r = json.loads(res[-1][7:])
            rows.append({"code": label, "placement": pl, "wall": wall, **r})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    print("\n| placement | code | load s | capture s | prune (score + streaming save) s | evaluate s | "
          "prune + evaluate s | whole run s | peak RSS GiB | decoder-layer bytes read by evaluate (GiB) | "
          "evaluate: storage read_bytes (GiB) | ppl |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s = {x["step"]: x for x in r["steps"]}
        pe = sum(s[k]["seconds"] for k in ("capture", "prune", "evaluate"))
        print(f"| {r['placement']} | {r['code']} | {s['load']['seconds']:.1f} | {s['capture']['seconds']:.1f} | "
              f"{s['prune']['seconds']:.1f} | {s['evaluate']['seconds']:.1f} | {pe:.1f} | {r['wall']:.1f} | "
              f"{max(x['peak_rss'] for x in r['steps']) / 2**30:.2f} | "
              f"{s['evaluate']['weight_bytes_read'] / 2**30:.2f} | {s['evaluate']['io_read_bytes'] / 2**30:.2f} | "
              f"{r['ppl']:.6g} |")
    (work / "bench_scale_engine.json").write_text(json.dumps(rows, indent=1))
    if cg:
        cg.rmdir()


def gib(b) -> str:
    return "–" if b is None else f"{b / 2**30:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["growth", "matrix", "big", "engine", "_worker"])
    ap.add_argument("--shape", default=None, choices=list(SHAPES))
    ap.add_argument("--layers", type=int, nargs="+", default=None)
    ap.add_argument("--placements", nargs="+", default=None)
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--tasks", nargs="*", default=None)
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--streamline-steps", type=int, default=4)
    ap.add_argument("--workdir", default=None, help="where checkpoints and homes go (default: a temporary folder)")
    ap.add_argument("--delete", action="store_true", help="delete each pruned checkpoint after its run (disk space)")
    ap.add_argument("--before-root", default=None, help="engine: a checkout of the code to compare against")
    ap.add_argument("--ppl-seq-len", type=int, default=256, help="engine: perplexity window (the spec's default)")
    ap.add_argument("--eval-batch", type=int, default=1, help="engine: evaluation batch (the spec's default)")
    ap.add_argument("--memory-limit-gb", type=float, default=None,
                    help="engine: run each worker in a memory cgroup of this size (page cache included)")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.mode == "_worker":
        engine_worker(a)
        return
    if a.mode == "engine":
        work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-scale-"))
        work.mkdir(parents=True, exist_ok=True)
        engine_mode(a, work, (a.layers or [4])[0])
        return
    defaults = {
        "growth": ("1536", [4, 16], ["disk", "device"], ["wanda"], ["pydoc_next_sentence"]),
        "matrix": ("8b", [2, 4, 8], ["device", "offload", "disk"], ["wanda", "llm-rank", "slimgpt", "llm-streamline"], []),
        "big": ("8b", [58], ["disk"], ["wanda", "llm-rank"], []),
    }[a.mode]
    shape = a.shape or defaults[0]
    layers = a.layers or defaults[1]
    placements = a.placements or defaults[2]
    methods = a.methods or defaults[3]
    if a.tasks is None:
        a.tasks = defaults[4]
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"# bench_scale {a.mode}: shape {shape} {SHAPES[shape]}, dtype {a.dtype}, device {a.device}, "
          f"calibration {a.n_samples}x{a.seq_len}, ppl {a.ppl_windows}x{a.seq_len}, tasks {a.tasks or 'none'}",
          flush=True)
    for n in layers:
        ckpt = work / f"llama-{shape}-{n}L"
        t0 = time.perf_counter()
        if not (ckpt / "config.json").exists():
            size = write_random_llama(ckpt, shape, n)
        else:
            size = json.loads((ckpt / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        print(f"checkpoint {ckpt.name}: {size / 1e9:.2f} GB of bf16 weights ({time.perf_counter() - t0:.0f} s to write)",
              flush=True)
        for method in methods:
            for pl in placements:
                home = work / f"home-{n}L-{method}-{pl}"
                shutil.rmtree(home, ignore_errors=True)
                r = run_cli(base_args(ckpt, method, pl, a), home)
                rep = r["report"] or {}
                ok = r["rc"] == 0
                row = {"layers": n, "weights_bytes": size, "method": method, "placement": pl, "rc": r["rc"],
                       "seconds": round(r["seconds"], 1), "peak_tree_rss": r["peak_tree_rss"], "max_rss": r["max_rss"],
                       "timings": rep.get("timings"), "host_memory": rep.get("host_memory"), "ppl_before": (rep.get("metrics_before") or {}).get("ppl"),
                       "ppl_after": (rep.get("metrics_after") or {}).get("ppl"),
                       "params_before": rep.get("params_before"), "params_after": rep.get("params_after")}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if not ok:
                    print(r["output"], flush=True)
                if a.delete:
                    shutil.rmtree(home, ignore_errors=True)
        if a.delete and a.mode == "big":
            shutil.rmtree(ckpt, ignore_errors=True)
    print("\n| layers | weights GiB | method | placement | peak RSS GiB | peak RSS so far after each step (GiB) | wall s | steps (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        steps = ", ".join(f"{k} {v:.0f}" for k, v in (r["timings"] or {}).items() if v)
        mem = ", ".join(f"{k} {v['peak_rss'] / 2**30:.2f}" for k, v in (r["host_memory"] or {}).items())
        print(f"| {r['layers']} | {r['weights_bytes'] / 2**30:.2f} | {r['method']} | {r['placement']} | "
              f"{gib(r['max_rss'])} | {mem} | {r['seconds']:.0f} | {steps} |")
    if a.mode == "growth":
        by = {(r["layers"], r["placement"], r["method"]): r for r in rows}
        lo, hi = min(layers), max(layers)
        for pl in placements:
            for method in methods:
                r0, r1 = by.get((lo, pl, method)), by.get((hi, pl, method))
                if r0 and r1 and r1 is not r0:
                    added = r1["weights_bytes"] - r0["weights_bytes"]
                    grow = r1["max_rss"] - r0["max_rss"]
                    print(f"{method} {pl}: {lo}->{hi} layers add {added / 2**20:.0f} MiB of weights; peak RSS grows "
                          f"{grow / 2**20:.0f} MiB = {100 * grow / added:.0f} % of the added weights")
    (work / f"bench_scale_{a.mode}.json").write_text(json.dumps(rows, indent=1))
    print(f"rows: {work / f'bench_scale_{a.mode}.json'}")


if __name__ == "__main__":
    main()
