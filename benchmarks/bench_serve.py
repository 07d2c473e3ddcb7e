"""Serving throughput on vLLM (CPU): `make run`'s result (SlimGPT 20 %, per-layer query heads, served through
pruneflow's vLLM plugin) against the dense model, at batch 1 and batch 8.

    PRUNEFLOW_HOME=/tmp/serve-home .venv/bin/python -m flows.cli run --quiet      # the default result, once
    .venv/bin/python benchmarks/bench_serve.py --run /tmp/serve-home/runs/smollm2-135m-slimgpt-0.2 \
        --json /tmp/bench_serve.json

The driver (.venv) finds the dense folder (the embedded smollm2-135m, as the run resolved it), the run's
`servable-vllm` folder (exported from its checkpoint when the run has none), counts both models'
parameters from their safetensors headers, then runs itself inside .venv-serve (`measure`): one
`vllm.LLM` at a time (float32, eager, in-process engine, one unbound OpenMP thread), greedy decoding of `--new` tokens (EOS ignored)
for 8 fixed prompts: batch 1 = the 8 requests one after the other, batch 8 = the 8 at once. tokens/s =
generated tokens / wall seconds; the median of `--repeats` after one warm-up round. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["def read_config(path):\n    \"\"\"", "The os module provides", "class LRUCache:\n    def __init__(self",
           "To open a file for reading, use", "import json\n\ndef load(", "A list comprehension is",
           "The difference between a tuple and a list", "for i, line in enumerate("]


def _params(folder: Path) -> int:
    """Parameters from the safetensors headers (a tied lm_head is not stored: counted once)."""
    from safetensors import safe_open

    n = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                shape = sf.get_slice(k).get_shape()
                size = 1
                for d in shape:
                    size *= d
                n += size
    return n


def drive(args) -> None:
    from pruning_core.export import export_checkpoint
    from pruning_core.models import resolve_model_path

    run = Path(args.run)
    report = json.loads((run / "report.json").read_text())
    dense = Path(resolve_model_path(report.get("model", "smollm2-135m")))
    served = run / "servable-vllm"
    if not (served / "config.json").is_file():
        export_checkpoint(run / "checkpoint", served)
    layout = json.loads((served / "config.json").read_text())["architectures"][0]
    job = {"models": {"dense": str(dense), "slimgpt-20%": str(served)}, "new": args.new, "repeats": args.repeats,
           "prompts": PROMPTS}
    jf = Path(args.json).with_suffix(".job.json")
    jf.write_text(json.dumps(job))
    # one OpenMP thread, not bound to a core: on a shared, loaded machine vLLM's default (one bound thread
    # per core) spins at its barriers and decodes ~100x slower
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2",
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([str(REPO / ".venv-serve" / "bin" / "python"), __file__, "measure", str(jf), args.json],
                   env=env, check=True)
    res = json.loads(Path(args.json).read_text())
    res["params"] = {"dense": _params(dense), "slimgpt-20%": _params(served)}
    res["architecture"] = {"dense": "LlamaForCausalLM", "slimgpt-20%": layout}
    res["load_average"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(res, indent=1))
    print(table(res))


def table(res: dict) -> str:
    pd = res["params"]["dense"]
    rows = ["| model | vLLM architecture | params | params vs dense | tokens/s batch 1 | tokens/s batch 8 |",
            "|---|---|---|---|---|---|"]
    for name, r in res["speed"].items():
        p = res["params"][name]
        rows.append(f"| {name} | {res['architecture'][name]} | {p:,} | {100 * p / pd:.1f} % | "
                    f"{r['batch1']:.1f} | {r['batch8']:.1f} |")
    s1 = res["speed"]["slimgpt-20%"]["batch1"] / res["speed"]["dense"]["batch1"]
    s8 = res["speed"]["slimgpt-20%"]["batch8"] / res["speed"]["dense"]["batch8"]
    rows.append(f"\npruned / dense throughput: x{s1:.2f} at batch 1, x{s8:.2f} at batch 8 "
                f"(load average at the end {', '.join(f'{x:.1f}' for x in res['load_average'])})")
    return "\n".join(rows)


def _rate(llm, sp, prompts: list[str], batch: int) -> float:
    """Generated tokens per wall second, `batch` requests at a time."""
    t0, n = time.perf_counter(), 0
    for i in range(0, len(prompts), batch):
        outs = llm.generate(prompts[i:i + batch], sp, use_tqdm=False)
        n += sum(len(o.outputs[0].token_ids) for o in outs)
    return n / (time.perf_counter() - t0)


def measure(job_file: str, out_file: str) -> None:
    """Inside .venv-serve: tokens/s of each model at batch 1 and batch 8."""
    import gc

    from vllm import LLM, SamplingParams

    job = json.loads(Path(job_file).read_text())
    sp = SamplingParams(temperature=0.0, max_tokens=int(job["new"]), ignore_eos=True)
    prompts = job["prompts"]
    speed = {}
    for name, path in job["models"].items():
        llm = LLM(model=path, dtype="float32", max_model_len=512, enforce_eager=True, max_num_seqs=8, seed=0)
        _rate(llm, sp, prompts, 8)  # warm-up
        speed[name] = {f"batch{b}": statistics.median(_rate(llm, sp, prompts, b) for _ in range(int(job["repeats"])))
                       for b in (1, 8)}
        print(name, speed[name], flush=True)
        del llm
        gc.collect()
    Path(out_file).write_text(json.dumps({"speed": speed, "new": job["new"], "repeats": job["repeats"]}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["measure"]:
        measure(sys.argv[2], sys.argv[3])
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="run folder of the SlimGPT 20 %% default (with report.json)")
    ap.add_argument("--json", default="/tmp/bench_serve.json")
    ap.add_argument("--new", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--repeats", type=int, default=3)
    drive(ap.parse_args())
