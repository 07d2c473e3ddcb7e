"""`schedule: search` against each method's best fixed profile (SlimGPT's log-increase, FLAP kv_group uniform,
Wanda-sp per_group uniform, LLM-Rank's defaults) on SmolLM2-135M, out of domain (issue 21).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_search.py run --seeds 42,43,44 --ratios 0.2,0.3
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_search.py table
    # why SlimGPT's search loses to log-increase: the summed table cost of both plans beside their PPL, and
    # the dense residual stream per layer (energy, share of its top hidden dimensions)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_search.py why --seeds 42

Protocol: bench_ood's (calibration 16 x 256 tokens of pydoc's train split, `random_windows`, seed s;
in-domain PPL on pydoc's eval split, out-of-domain PPL on `pkgdocs`, 256-token windows). Per seed the
per-layer tables (`search.build_tables`) are built once and reused by every ratio; each row is one
(schedule, ratio, seed). The search's cost is the table build + solve, as a multiple of the default
SlimGPT prune at 20 % of the same seed. Rows append to `--json`; a rerun skips finished ones.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_ood import Bench, _agg, _append  # noqa: E402

from pruning_core import search_tables  # noqa: E402
from pruning_core.methods import get_method  # noqa: E402
from pruning_core.surgery import apply_plan  # noqa: E402

DEFAULT_JSON = HERE / ".bench_search.json"
TABLES = HERE / ".bench_search_tables"
ROWS = {  # row -> (method, settings); the first row of each method is its best fixed profile (bench_ood's
    # ood-slimgpt table: SlimGPT per_group + log-increase, FLAP kv_group uniform, Wanda-sp per_group uniform,
    # LLM-Rank's defaults), the others search under the same budget
    "slimgpt log_increase (default)": ("slimgpt", {}),
    "slimgpt search (kl)": ("slimgpt", {"schedule": "search", "search": {"sensitivity": "kl"}}),
    "slimgpt search (residual)": ("slimgpt", {"schedule": "search", "search": {"sensitivity": "residual"}}),
    "slimgpt search (residual, drop_blocks)": ("slimgpt", {"schedule": "search",
                                                           "search": {"sensitivity": "residual", "drop_blocks": True}}),
    "flap uniform kv_group (default)": ("flap", {}),
    "flap search (kl)": ("flap", {"schedule": "search", "search": {"sensitivity": "kl"}}),
    "flap search (residual)": ("flap", {"schedule": "search", "search": {"sensitivity": "residual"}}),
    "wanda-sp per_group uniform": ("wanda", {"gqa": "per_group"}),
    "wanda-sp per_group search (kl)": ("wanda", {"gqa": "per_group", "schedule": "search",
                                                 "search": {"sensitivity": "kl"}}),
    "wanda-sp per_group search (kl, drop_blocks)": ("wanda", {"gqa": "per_group", "schedule": "search",
                                                              "search": {"sensitivity": "kl", "drop_blocks": True}}),
    "wanda-sp per_group search (residual)": ("wanda", {"gqa": "per_group", "schedule": "search",
                                                       "search": {"sensitivity": "residual"}}),
    "llm-rank (default)": ("llm-rank", {}),
    "llm-rank search (kl)": ("llm-rank", {"schedule": "search", "search": {"sensitivity": "kl"}}),
    "llm-rank search (residual)": ("llm-rank", {"schedule": "search", "search": {"sensitivity": "residual"}}),
}
BASE = {}  # method -> its fixed row
for _name, (_m, _s) in ROWS.items():
    BASE.setdefault(_m, _name)


def _tables(bench, calib, a, seed: int, st, cache: dict, row: dict) -> dict:
    """The per-layer tables of (calibration, seed, sensitivity, gqa, OBS-compensated or not): built once,
    saved for restarts, reused by every ratio and by the methods that share them."""
    comp = bool(getattr(st, "compensate", False))
    key = f"{a.calib}-{seed}-{st.search.sensitivity}" + ("" if comp else f"-zero-{st.gqa}")
    if key not in cache:
        saved = TABLES / f"{key}.safetensors"  # a restarted run reuses them
        if saved.exists():
            from safetensors.torch import load_file

            cache[key] = load_file(str(saved))
        else:
            from safetensors.torch import save_file

            t0 = time.perf_counter()
            cache[key] = search_tables.build_tables(bench.model, bench.adapter, calib, st.gqa,
                                                    getattr(st, "percdamp", 0.01), comp,
                                                    getattr(st, "head_score", "grouped"), st.search,
                                                    batch_size=getattr(st, "batch_size", 8))
            row["tables_s"] = time.perf_counter() - t0
            TABLES.mkdir(exist_ok=True)
            save_file(cache[key], str(saved))
    return cache[key]


def run(a) -> None:
    from pruning_core.search import select_searched

    path = Path(a.json)
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {(r["row"], r["ratio"], r["seed"]) for r in rows}
    bench = Bench(a.model, a.id_windows, a.ood_windows, a.threads)
    if not any(r["row"] == "dense" for r in rows):
        row = bench.evaluate(bench.model, 0) | dict(row="dense", ratio=0.0, seed=0)
        _append(path, row), rows.append(row)
        print(json.dumps(row), flush=True)
    names = [n.strip() for n in a.rows.split("|")] if a.rows else list(ROWS)
    for seed in [int(s) for s in a.seeds.split(",")]:
        calib = bench.calib(a.calib, seed)
        tables: dict = {}
        for ratio in [float(r) for r in a.ratios.split(",")]:
            for name in names:
                if (name, ratio, seed) in done:
                    continue
                method, settings = ROWS[name]
                meth = get_method(method)
                st = meth.parse_settings(settings)
                row = dict(row=name, method=method, ratio=ratio, seed=seed, calib=a.calib)
                search = getattr(st, "schedule", None) == "search"
                tabs = _tables(bench, calib, a, seed, st, tables, row) if search else None
                m = copy.deepcopy(bench.model)
                t0 = time.perf_counter()
                if meth.coupled:
                    plan = meth.prune(m, bench.adapter, calib, ratio, st, **({"tables": tabs} if search else {}))
                else:
                    scores = meth.score(m, bench.adapter, bench.stats(a.calib, seed, meth.needs), st)
                    plan = (select_searched(m, bench.adapter, scores, ratio, st, method, tabs) if search
                            else meth.select(m, bench.adapter, scores, ratio, st))
                apply_plan(m, plan)
                row["prune_s"] = time.perf_counter() - t0
                if "search" in plan.notes:
                    row["search"] = {k: v for k, v in plan.notes["search"].items() if k != "memory_at"}
                row["removed_heads"] = plan.notes.get("removed_head_units")
                row["removed_ffn"] = plan.notes.get("removed_ffn")
                row |= bench.evaluate(m, 0)
                _append(path, row), rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k not in ("search", "removed_heads", "removed_ffn")}),
                      flush=True)
    print(table(json.loads(path.read_text())))


def table(rows: list[dict]) -> str:
    seen, uniq = set(), []  # two processes sharing the file may have run a (row, ratio, seed) twice: the first counts
    for r in rows:
        k = (r["row"], r["ratio"], r["seed"])
        if k not in seen:
            seen.add(k)
            uniq.append(r)
    rows = uniq
    dense = next((r for r in rows if r["row"] == "dense"), None)
    head = ["row", "ratio", "params (M)", "seeds", "in-domain PPL (pydoc)", "out-of-domain PPL (pkgdocs)",
            "OOD vs the method's fixed profile, per seed", "prune s", "search s (tables + solve) / default prune at 20 %"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if dense:
        out.append(f"| dense | 0 | {dense['params'] / 1e6:.2f} | – | {dense['ppl_id']:.2f} | {dense['ppl_ood']:.2f} | – | – | – |")
    for name, (method, _s) in ROWS.items():
        base = {(r["ratio"], r["seed"]): r for r in rows if r["row"] == BASE[method]}
        for ratio in sorted({r["ratio"] for r in rows if r["row"] == name}):
            rs = [r for r in rows if r["row"] == name and r["ratio"] == ratio]
            rel = [f"{100 * (r['ppl_ood'] / base[ratio, r['seed']]['ppl_ood'] - 1):+.1f} %" for r in rs
                   if (ratio, r["seed"]) in base and name != BASE[method]]
            cost = []
            for r in rs:
                t = next((x.get("tables_s") for x in rows if x["row"] == name and x["seed"] == r["seed"]
                          and x.get("tables_s")), None)
                b = next((x for x in rows if x["row"] == "slimgpt log_increase (default)" and x["ratio"] == 0.2
                          and x["seed"] == r["seed"]), None)
                if t and b and "search" in r:
                    cost.append((t + r["search"]["solve_seconds"]) / b["prune_s"])
            out.append(f"| {name} | {ratio:g} | {statistics.mean(r['params'] for r in rs) / 1e6:.2f} | "
                       f"{','.join(str(r['seed']) for r in rs)} | {_agg([r['ppl_id'] for r in rs], '{:.2f}')} | "
                       f"{_agg([r['ppl_ood'] for r in rs], '{:.2f}')} | {', '.join(rel) or '–'} | "
                       f"{_agg([r['prune_s'] for r in rs], '{:.0f}')} | {_agg(cost, '{:.2f}x') if cost else '–'} |")
    return "\n".join(out)


def why(a) -> None:
    """For SlimGPT rows already in `--json`: the summed per-layer table cost (the search's objective, on the
    seed's `residual` tables) of the default plan and of the searched plan, with their PPL; then the dense
    model's residual stream per layer on the calibration blocks: mean energy per token and the share of it
    in the 8 largest hidden dimensions (massive activations, Sun et al. 2024)."""
    import torch

    rows = json.loads(Path(a.json).read_text())
    bench = Bench(a.model, 1, 1, a.threads)
    meth = get_method("slimgpt")
    for seed in [int(x) for x in a.seeds.split(",")]:
        calib = bench.calib(a.calib, seed)
        st = meth.parse_settings({"schedule": "search", "search": {"sensitivity": "residual"}})
        tabs = _tables(bench, calib, a, seed, st, {}, {})
        print(f"\nseed {seed}: summed table cost (residual) of each plan")
        print("| row | ratio | cost: attention | cost: FFN | cost: total | of it layers 0-11 | in-domain PPL | out-of-domain PPL |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r["seed"] != seed or not r["row"].startswith("slimgpt") or not r.get("removed_heads"):
                continue
            rh, rf = r["removed_heads"], r["removed_ffn"]
            ca = [float(tabs[f"attn.{i}"][h]) for i, h in enumerate(rh)]
            cf = [float(tabs[f"ffn.{i}"][c]) for i, c in enumerate(rf)]
            print(f"| {r['row']} | {r['ratio']:g} | {sum(ca):.5f} | {sum(cf):.5f} | {sum(ca) + sum(cf):.5f} | "
                  f"{sum(ca[:12]) + sum(cf[:12]):.5f} | {r['ppl_id']:.2f} | {r['ppl_ood']:.2f} |")
        with torch.no_grad():
            hs = bench.model(input_ids=calib[:8], output_hidden_states=True).hidden_states[1:]
        print(f"\nseed {seed}: dense residual stream after each layer (8 calibration blocks)")
        print("| layer | energy per token | share in the top-8 of " + str(hs[0].shape[-1]) + " dims | residual scale (1 / 2 energy) |")
        print("|---|---|---|---|")
        for i, h in enumerate(hs):
            e = h.float().pow(2)
            per_dim = e.sum((0, 1))
            top = float(per_dim.topk(8).values.sum() / per_dim.sum())
            print(f"| {i} | {float(e.sum(-1).mean()):.1f} | {top:.2f} | {float(tabs['scale'][i, 1]):.3g} |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", nargs="?", default="run", choices=("run", "table", "why"))
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--ratios", default="0.2,0.3")
    ap.add_argument("--rows", default="", help="'|'-separated row names (default: all)")
    ap.add_argument("--calib", default="16x256")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--id-windows", type=int, default=32)
    ap.add_argument("--ood-windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(DEFAULT_JSON))
    a = ap.parse_args(argv)
    if a.cmd == "table":
        print(table(json.loads(Path(a.json).read_text())))
    elif a.cmd == "why":
        why(a)
    else:
        run(a)


if __name__ == "__main__":
    main()
