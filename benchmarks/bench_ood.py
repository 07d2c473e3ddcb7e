"""Quality in and out of domain: every method calibrated on pydoc, scored on pydoc *and* on `pkgdocs`.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_ood.py run --grid slimgpt --seeds 42,43,44
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_ood.py table --grid slimgpt
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_ood.py table --grid slimgpt --write   # its RESULTS.md section

Protocol (issue #13): calibration = N windows x L tokens of pydoc's *train* split, drawn as the
Wanda / SparseGPT / LLM-Rank loaders do (`random.seed(seed)`, `randint` starts, with replacement:
`calibration_set(..., sampling="random_windows")`); in-domain PPL = pydoc's eval split, out-of-domain
PPL = `pkgdocs` (installed packages' README prose, evaluation-only), both non-overlapping 256-token
windows scored on their own, no BOS (`metrics.perplexity`). Optional: the offline lm-eval cloze
`pkgdocs_last_word` (200 items, chance ~0). Each row is one (grid row, seed); tables give the mean
and the [min, max] over seeds. Rows are appended to `--json` as they finish, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_slimgpt import _counts_plan  # noqa: E402

from pruning_core import prune as pf_prune  # noqa: E402
from pruning_core.adapters import adapter_for  # noqa: E402
from pruning_core.capture import capture_stats  # noqa: E402
from pruning_core.data import calibration_set, eval_tokens  # noqa: E402
from pruning_core.methods import get_method  # noqa: E402
from pruning_core.metrics import perplexity  # noqa: E402
from pruning_core.models import load_model  # noqa: E402
from pruning_core.select import solve_schedule  # noqa: E402
from pruning_core.surgery import apply_plan, count_params  # noqa: E402

SECTION = "ood-quality"
DEFAULT_JSON = HERE / ".bench_ood.json"

# row name -> dict(method, settings, ratio, calib "NxL", recover: None | dict)
_OLD_RECIPE = {"steps": 200, "lr": 2e-4, "min_lr": 5e-5, "warmup_steps": 10, "loss_skip_tokens": 0}
R20 = 0.2
GRIDS: dict[str, dict[str, dict]] = {
    # item 2: SlimGPT candidates (and the other width methods at the same budget)
    "slimgpt": {  # rows without a head scale in the name remove heads at the layer's ratio (paper, scale 1.0)
        "slimgpt kv_group (old default)": dict(method="slimgpt", settings={"head_ratio_scale": 1.0, "gqa": "kv_group"}),
        "slimgpt per_group": dict(method="slimgpt", settings={"head_ratio_scale": 1.0, "gqa": "per_group"}),
        "slimgpt per_group, heads at 0.75 r": dict(method="slimgpt", settings={"gqa": "per_group",
                                                                              "head_ratio_scale": 0.75}),
        "slimgpt per_group, heads at 0.5 r": dict(method="slimgpt", settings={"gqa": "per_group",
                                                                             "head_ratio_scale": 0.5}),
        "slimgpt FFN only (head_ratio_scale 0)": dict(method="slimgpt", settings={"head_ratio_scale": 0.0}),
        "slimgpt per_group, uniform": dict(method="slimgpt", settings={"head_ratio_scale": 1.0, "gqa": "per_group", "schedule": "uniform"}),
        "slimgpt per_group, damp 0.1": dict(method="slimgpt", settings={"head_ratio_scale": 1.0, "gqa": "per_group", "percdamp": 0.1}),
        "slimgpt per_group, Hessians on dense inputs": dict(method="slimgpt", settings={"head_ratio_scale": 1.0, "gqa": "per_group",
                                                                                    "hessian_inputs": "dense"}),
        "slimgpt heads at 0.75 r, Hessians on dense inputs": dict(method="slimgpt", settings={
            "head_ratio_scale": 0.75, "hessian_inputs": "dense"}),
        "slimgpt per_group, damp 0.001": dict(method="slimgpt", settings={"head_ratio_scale": 1.0, "gqa": "per_group", "percdamp": 0.001}),
        "slimgpt heads at 0.75 r, damp 0.001": dict(method="slimgpt", settings={"head_ratio_scale": 0.75,
                                                                               "percdamp": 0.001}),
        "slimgpt per_group, floor 8": dict(method="slimgpt", settings={"head_ratio_scale": 1.0, "gqa": "per_group", "ffn_group_floor": 8}),
        "slimgpt per_group, no DGS": dict(method="slimgpt", settings={"head_ratio_scale": 1.0, "gqa": "per_group", "dynamic_group_size": False}),
        "flap kv_group (default)": dict(method="flap", settings={"gqa": "kv_group"}),
        "flap per_group": dict(method="flap", settings={"gqa": "per_group"}),
        "flap al_am (FLAP's adaptive structure)": dict(method="flap", settings={"structure": "al_am"}),
        "wanda-sp kv_group": dict(method="wanda", settings={"gqa": "kv_group"}, match_slimgpt=True),
        "wanda-sp per_group": dict(method="wanda", settings={"gqa": "per_group"}, match_slimgpt=True),
        "random per_group": dict(method="random", settings={"gqa": "per_group"}, match_slimgpt=True),
    },
    # item 4: LLM-Rank, does the PageRank term add anything?
    "llmrank": {
        f"{name} {int(r * 100)} %": dict(method=m, settings=st, ratio=r)
        for r in (0.2, 0.3)
        for name, m, st in (
            ("llm-rank paper (γ 0.9, up, chained)", "llm-rank", {"gamma": 0.9, "node": "up", "pipeline": "chained"}),
            ("llm-rank default (γ 0.5, down_in)", "llm-rank", {}),
            ("activation norm (γ 0)", "llm-rank", {"gamma": 0.0}),
            ("wanda-sp FFN", "wanda", {"targets": ["ffn"]}),
            ("random FFN", "random", {"targets": ["ffn"]}),
        )
    },
    # item 5: calibration size
    "calib": {
        f"{m} {c}": dict(method=m, settings=st, calib=c)
        for c in ("8x128", "32x128", "16x256", "64x256", "128x256")
        for m, st in (("slimgpt", {}), ("flap", {}), ("wanda", {}))
    },
    # item 3: Streamline on one block (7 of 30 layers), replacement recipes
    "streamline": {
        "shortgpt 7 layers": dict(method="shortgpt", settings={"n_layers": 7}, calib="64x256"),
        "streamline none": dict(method="llm-streamline", settings={"n_layers": 7, "replacement": "none"},
                                calib="64x256"),
        "streamline layer, defaults": dict(method="llm-streamline", calib="64x256",
                                           settings={"n_layers": 7, "replacement": "layer"}),
        # every recipe row spells out what it ran with: the defaults before issue 13's runs, then its changes
        **{f"streamline layer, {k}": dict(method="llm-streamline", calib="64x256",
                                          settings={"n_layers": 7, "replacement": "layer"} | _OLD_RECIPE | v)
           for k, v in {
               "200 steps × 4, lr 2e-4 → 5e-5 (old defaults)": {},
               "140 steps (10 epochs of 56 blocks)": {"steps": 140},
               "lr 1e-3": {"lr": 1e-3, "min_lr": 1e-4},
               "loss skips token 0": {"loss_skip_tokens": 1},
               "100 steps, batch 8, lr 5e-4": {"steps": 100, "batch_size": 8, "lr": 5e-4},
               # the reference's recipe on the same data: 10 epochs of the 56 training blocks at
               # micro-batch 8, lr 2e-4 that barely decays (its scheduler bug), AdamW wd 1e-3
               "reference recipe (70 steps × 8 = 10 epochs, lr 2e-4 flat)": {
                   "steps": 70, "batch_size": 8, "lr": 2e-4, "min_lr": 2e-4, "warmup_steps": 0},
               "56 steps × 4 (4 epochs), lr 1e-3 → 1e-4": {"steps": 56, "lr": 1e-3, "min_lr": 1e-4,
                                                         "warmup_steps": 4, "eval_every": 14},
               "112 steps × 4 (8 epochs), lr 1e-3 → 1e-4": {"steps": 112, "lr": 1e-3, "min_lr": 1e-4,
                                                          "warmup_steps": 4, "eval_every": 28},
               "96 steps × 4, lr 1e-3 → 1e-4, loss skips token 0": {
                   "steps": 96, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 4, "loss_skip_tokens": 1},
               "96 steps × 4, lr 2e-3 → 2e-4, loss skips token 0": {
                   "steps": 96, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 4, "loss_skip_tokens": 1},
               "96 steps × 4, lr 2e-3 → 2e-4": {"steps": 96, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 4},
               "88 steps × 4, lr 2e-3 → 2e-4, loss skips token 0": {
                   "steps": 88, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 4, "loss_skip_tokens": 1},
               "80 steps × 4, lr 2e-3 → 2e-4, loss skips token 0": {
                   "steps": 80, "lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 4, "loss_skip_tokens": 1},
               "80 steps × 4, lr 3e-3 → 3e-4, loss skips token 0": {
                   "steps": 80, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 4, "loss_skip_tokens": 1},
           }.items()},
    },
    # item 7: LoRA on pydoc, does it help out of domain?
    "lora": {
        "slimgpt 20 %": dict(method="slimgpt", settings={}),
        "slimgpt 20 % + LoRA (pydoc train, r 8, 100 steps)": dict(method="slimgpt", settings={},
                                                                   recover={"rank": 8, "steps": 100}),
    },
}


def _row_spec(spec: dict) -> dict:
    return dict(ratio=R20, calib="16x256", recover=None) | spec


def _same_row(spec: dict) -> str:
    """Rows of different grids that are one experiment (e.g. `slimgpt per_group` and `slimgpt 16x256`)
    share a key, so a finished one is reused rather than rerun. Defaults are spelled out first."""
    s = _row_spec(spec)
    st = get_method(s["method"]).parse_settings(s["settings"]).model_dump()
    return json.dumps(dict(s, settings=st), sort_keys=True, default=str)


class Bench:
    def __init__(self, model_ref: str, id_windows: int, ood_windows: int, threads: int):
        torch.set_num_threads(threads)
        self.model, self.tok = load_model(model_ref, device="cpu")
        self.adapter = adapter_for(self.model)
        self.id_ids, self.ood_ids = eval_tokens(self.tok, "pydoc"), eval_tokens(self.tok, "pkgdocs")
        self.id_windows, self.ood_windows = id_windows, ood_windows
        self._calib: dict = {}
        self._stats: dict = {}

    def calib(self, spec: str, seed: int) -> torch.Tensor:
        if (spec, seed) not in self._calib:
            n, L = (int(x) for x in spec.split("x"))
            self._calib[spec, seed] = calibration_set(self.tok, "pydoc", n, L, seed=seed, sampling="random_windows")
        return self._calib[spec, seed]

    def stats(self, spec: str, seed: int, needs) -> dict:
        """Dense-model statistics, shared by every score-then-select row of one calibration set."""
        req = frozenset({"attn_gram", "mlp_gram", "cosine"} & set(needs))
        key = (spec, seed, req)
        if key not in self._stats:
            self._stats = {key: capture_stats(self.model, self.adapter, self.calib(spec, seed), requests=req)}
        return self._stats[key]

    def evaluate(self, m, cloze: int) -> dict:
        out = dict(params=count_params(m),
                   ppl_id=perplexity(m, self.id_ids, 256, self.id_windows, batch_size=4)["ppl"],
                   ppl_ood=perplexity(m, self.ood_ids, 256, self.ood_windows, batch_size=4)["ppl"])
        if cloze:
            from pruning_core.evaluate import run_lm_eval

            res = run_lm_eval(m, ["pkgdocs_last_word"], limit=cloze, batch_size=8, tokenizer=self.tok)["results"]
            out["cloze"] = float(res["pkgdocs_last_word"]["acc"])
        return out

    def run_row(self, name: str, spec: dict, seed: int, cloze: int) -> dict:
        spec = _row_spec(spec)
        m = copy.deepcopy(self.model)
        meth = get_method(spec["method"])
        calib = self.calib(spec["calib"], seed)
        t0, c0 = time.perf_counter(), time.process_time()
        if spec["method"] == "llm-streamline":  # cosine statistics shared across rows; the dense model teaches
            from pruning_core.methods import streamline as sl

            st = sl.StreamlineSettings(**spec["settings"])
            plan = sl.select(m, self.adapter, sl.score(m, self.adapter, self.stats(spec["calib"], seed, {"cosine"}), st),
                             spec["ratio"], st)  # settings.n_layers, when set, overrides it
            apply_plan(m, plan)
            if st.replacement in ("layer", "ffn") and st.steps > 0:
                plan.notes["training"] = sl.train_replacement(self.model, m, plan, calib, st)
        elif meth.coupled:
            plan = pf_prune(m, spec["method"], calib, spec["ratio"], spec["settings"])
        else:
            st = meth.parse_settings(spec["settings"])
            stats = self.stats(spec["calib"], seed, meth.needs)
            scores = meth.score(m, self.adapter, stats, st)
            if spec.get("match_slimgpt"):  # width baselines: the same per-layer counts as uniform SlimGPT
                gqa = spec["settings"].get("gqa", "kv_group")
                sched = solve_schedule(m, self.adapter, spec["ratio"], "uniform", gqa=gqa)
                plan = _counts_plan(m, self.adapter, scores, sched, spec["method"], gqa)
            else:
                plan = meth.select(m, self.adapter, scores, spec["ratio"], st)
            apply_plan(m, plan)
        # process CPU seconds: on a loaded machine a better proxy of idle one-thread wall time than wall time
        row = dict(prune_s=time.perf_counter() - t0, prune_cpu_s=time.process_time() - c0)
        if "training" in plan.notes:
            row["training"] = {k: v for k, v in plan.notes["training"].items() if k not in ("loss_curve", "lr_curve")}
        if spec["recover"]:
            row["before"] = self.evaluate(m, 0)
            from pruning_core.data import load_text, tokenize_text
            from pruning_core.recover import lora_recover

            train = tokenize_text(self.tok, load_text("pydoc", "train"))
            m, info = lora_recover(m, self.tok, train, spec["recover"] | {"seed": seed})
            row["recover_s"] = info["seconds"]
        row |= self.evaluate(m, cloze)
        self.last_model = m  # bench_distill recovers this pruned model in several ways
        return row


def _append(path: Path, row: dict) -> None:
    """Append one row to the JSON list under a lock (several runs may share the file)."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        rows = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(rows + [row], indent=1))


def run(a) -> None:
    path = Path(a.json)
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {(r["row"], r["seed"]) for r in rows}
    same = {(_same_row(GRIDS[r["grid"]][r["row"]]), r["seed"]): r for r in rows
            if r.get("grid") in GRIDS and r["row"] in GRIDS[r["grid"]]}
    bench = None
    grid = GRIDS[a.grid]
    names = list(grid)
    if a.rows:  # exact names, in the order given
        names = [k.strip() for k in a.rows.split("|")]
        bad = [k for k in names if k not in grid]
        if bad:
            raise SystemExit(f"--rows: got {bad}; accepted: {list(grid)}")
    for seed in [int(s) for s in a.seeds.split(",")]:
        for name in ([] if a.skip_dense else ["dense"]) + names:
            if (name, seed) in done or (name == "dense" and _dense(rows, a.id_windows, a.ood_windows)):
                continue
            key = (_same_row(grid[name]), seed) if name != "dense" else None
            twin = same.get(key)
            if twin and (twin["id_windows"], twin["ood_windows"]) == (a.id_windows, a.ood_windows) \
                    and (not a.cloze or "cloze" in twin):
                row = dict(twin, row=name, grid=a.grid, reused_from=f"{twin['grid']}: {twin['row']}")
            else:
                bench = bench or Bench(a.model, a.id_windows, a.ood_windows, a.threads)
                t0 = time.perf_counter()
                row = (bench.evaluate(bench.model, a.cloze) if name == "dense"
                       else bench.run_row(name, grid[name], seed, a.cloze))
                row |= dict(row=name, seed=seed, grid=a.grid if name != "dense" else "*",
                            wall_s=time.perf_counter() - t0, id_windows=a.id_windows, ood_windows=a.ood_windows)
            if key:
                same.setdefault(key, row)
            _append(path, row)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(table(json.loads(path.read_text()), a.grid))


def _agg(vals: list[float], fmt: str) -> str:
    if not vals:
        return "–"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} [{fmt.format(min(vals))}, {fmt.format(max(vals))}]"


def _dense(rows: list[dict], id_windows: int, ood_windows: int) -> dict | None:
    """The dense row evaluated on the same windows."""
    return next((r for r in rows if r["row"] == "dense" and (r["id_windows"], r["ood_windows"]) == (id_windows, ood_windows)),
                None)


def table(rows: list[dict], grid: str) -> str:
    mine = [r for r in rows if r.get("grid") == grid]
    dense = _dense(rows, mine[0]["id_windows"], mine[0]["ood_windows"]) if mine else None
    names = [n for n in GRIDS[grid] if any(r["row"] == n for r in mine)]
    lora = grid == "lora"
    head = ["row", "calib", "params (M)", "seeds", "in-domain PPL (pydoc)", "out-of-domain PPL (pkgdocs)"]
    head += ["OOD PPL before LoRA", "ID PPL before LoRA"] if lora else []
    train = grid == "streamline"
    head += ["train s", "val MSE before → best (step)"] if train else []
    head += ["cloze acc", "prune s (noisy)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if dense:
        out.append(f"| dense | – | {dense['params'] / 1e6:.1f} | – | {dense['ppl_id']:.2f} | {dense['ppl_ood']:.2f} | "
                   + ("– | – | " if lora or train else "") + f"{_agg([dense['cloze']] if 'cloze' in dense else [], '{:.3f}')} | – |")
    for n in names:
        rs = [r for r in mine if r["row"] == n]
        spec = _row_spec(GRIDS[grid][n])
        cells = [n, spec["calib"], f"{rs[0]['params'] / 1e6:.1f}", ",".join(str(r["seed"]) for r in rs),
                 _agg([r["ppl_id"] for r in rs], "{:.2f}"), _agg([r["ppl_ood"] for r in rs], "{:.2f}")]
        if lora:
            cells += [_agg([r["before"]["ppl_ood"] for r in rs if "before" in r], "{:.2f}"),
                      _agg([r["before"]["ppl_id"] for r in rs if "before" in r], "{:.2f}")]
        if train:
            tr = [r["training"] for r in rs if "training" in r]
            cells += [_agg([t["seconds"] for t in tr], "{:.0f}"),
                      "; ".join(f"{t['val_mse_before']:.2f} → {t['val_mse_after']:.2f} ({t['best_step']})" for t in tr)
                      or "–"]
        cells += [_agg([r["cloze"] for r in rs if "cloze" in r], "{:.3f}"), _agg([r["prune_s"] for r in rs], "{:.0f}")]
        out.append("| " + " | ".join(cells) + " |")
    w = mine[0] if mine else dense or {}
    out.append(f"\nPPL over {w.get('id_windows', '?')} (pydoc eval) / {w.get('ood_windows', '?')} (pkgdocs) "
               "non-overlapping 256-token windows, no BOS; mean [min, max] over the listed calibration seeds.")
    return "\n".join(out)


TITLES = {
    "slimgpt": "SlimGPT candidates against FLAP, Wanda-sp and random at 20 % (item 2)",
    "calib": "calibration size: SlimGPT, FLAP and Wanda at 20 % (item 5)",
    "streamline": "LLM-Streamline, 7 of 30 layers: `none` and replacement recipes (item 3)",
    "llmrank": ("LLM-Rank at 20 % and 30 % of the decoder-layer parameters, all from FFN channels: does the "
                "PageRank term add anything? (item 4)"),
    "lora": "LoRA recovery on pydoc, measured in and out of domain (item 7)",
}


def section(grid: str, rows: list[dict]) -> str:
    """A grid's RESULTS.md section: title, the command that regenerates every row it shows, the table."""
    mine = [r for r in rows if r.get("grid") == grid]
    names = [n for n in GRIDS[grid] if any(r["row"] == n for r in mine)]
    by_seeds: dict[str, list[str]] = {}
    for n in names:
        by_seeds.setdefault(",".join(str(r["seed"]) for r in mine if r["row"] == n), []).append(n)
    w = mine[0]
    cmds = [f"HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_ood.py run --grid {grid} --seeds {seeds} "
            f"--threads 2 --id-windows {w['id_windows']} --ood-windows {w['ood_windows']} --rows \"{'|'.join(ns)}\""
            for seeds, ns in by_seeds.items()]
    return (f"## Out of domain (issue 13): {TITLES.get(grid, grid)}\n\nRegenerate (rows append to "
            "`benchmarks/.bench_ood.json` and a rerun skips finished ones; a row that is the same experiment "
            "as one of another grid is reused):\n\n```\n" + "\n".join(cmds) + "\n```\n\n" + table(rows, grid))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", nargs="?", default="run", choices=("run", "table"))
    ap.add_argument("--grid", default="slimgpt", choices=sorted(GRIDS))
    ap.add_argument("--rows", default="", help="only these rows, in this order ('|'-separated exact names)")
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--id-windows", type=int, default=32)
    ap.add_argument("--ood-windows", type=int, default=64)
    ap.add_argument("--cloze", type=int, default=0, help="items of pkgdocs_last_word per row (0: none)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-dense", action="store_true", help="leave the dense row to another run")
    ap.add_argument("--json", default=str(DEFAULT_JSON))
    ap.add_argument("--write", action="store_true", help="write the RESULTS.md section of --grid (with `table`) "
                    "or of every grid with rows, from the JSON (nothing is run)")
    a = ap.parse_args(argv)
    if a.write:  # the table of each grid that has rows, as its RESULTS.md section (the reading is in ood-<grid>-notes)
        from run_all import write_section

        rows = json.loads(Path(a.json).read_text())
        for g in GRIDS if a.cmd == "run" and not a.rows else [a.grid]:
            if any(r.get("grid") == g for r in rows):
                write_section(f"ood-{g}", section(g, rows))
        return
    if a.cmd == "table":
        print(table(json.loads(Path(a.json).read_text()), a.grid))
        return
    run(a)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main()
