"""`make bench`: regenerate benchmarks/RESULTS.md.

1. Runs every per-method benchmark script present (`bench_*.py` in this folder, each with its own
   defaults). A script that manages its own section (it defines `SECTION = "..."` and has a
   `--write` flag) is run with `--write`; for the others, their stdout (Markdown tables) replaces
   the section `<!-- BEGIN name -->...<!-- END name -->` of RESULTS.md, `name` being the script's
   `SECTION` if it has one, else the section already holding that script's name, else its stem.
   A script that fails leaves its old section untouched and is reported.
2. The full comparison of all registered methods at one ratio (20 %) on `smollm2-135m`: every method
   prunes a fresh copy of the dense model from the same calibration set; the pruned model is saved,
   evaluated *by path* (fixed-window PPL, the offline lm-eval tasks) and timed against the dense
   model in this one process (`efficiency.measure`, warm-up + median); the dense lm-eval results are
   cached (`evaluate.cached_lm_eval`). The table is `report.compare` - the table a paper would print -
   written to the section `full-comparison`.

    .venv/bin/python benchmarks/run_all.py                     # everything (long on a 2-core CPU)
    .venv/bin/python benchmarks/run_all.py --only compare      # just the comparison
    .venv/bin/python benchmarks/run_all.py --only scripts --skip bench_capture
    .venv/bin/python benchmarks/run_all.py --only compare --methods wanda,l2 --limit 50 --windows 8
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

COMPARE_SECTION = "full-comparison"


def log(msg: str) -> None:
    print(f"[run_all {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- RESULTS.md sections ---------------------------------------------------------------------------


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)


def write_section(name: str, md: str, path: Path = RESULTS) -> None:
    """Replace (or append) one delimited section, atomically; the rest of the file is untouched."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"<!-- BEGIN {name} -->\n{md.rstrip()}\n<!-- END {name} -->"
    pat = _pattern(name)
    text = pat.sub(lambda _: block, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _script_section(script: Path) -> tuple[str | None, bool]:
    """(section name declared by the script, whether it writes that section itself with --write)."""
    src = script.read_text()
    m = re.search(r'^SECTION\s*=\s*["\']([^"\']+)["\']', src, re.M)
    return (m.group(1) if m else None), ('"--write"' in src and m is not None)


def _existing_section_for(stem: str) -> str | None:
    """A section of RESULTS.md whose body mentions this script (e.g. its regenerate command)."""
    if not RESULTS.exists():
        return None
    text = RESULTS.read_text()
    for m in re.finditer(r"<!-- BEGIN (\S+) -->(.*?)<!-- END \1 -->", text, re.S):
        if f"{stem}.py" in m.group(2):
            return m.group(1)
    return None


def run_scripts(skip: list[str], timeout: float) -> list[tuple[str, str, float]]:
    status = []
    for script in sorted(HERE.glob("bench_*.py")):
        stem = script.stem
        if stem in skip:
            continue
        section, self_writes = _script_section(script)
        cmd = [sys.executable, str(script)] + (["--write"] if self_writes else [])
        log(f"{stem}: {' '.join(cmd[1:])}")
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            status.append((stem, f"timed out after {timeout:.0f} s (section left as it was)", time.perf_counter() - t0))
            continue
        dt = time.perf_counter() - t0
        if p.returncode != 0:
            tail = (p.stderr or "").strip().splitlines()[-1:] or ["?"]
            status.append((stem, f"failed (exit {p.returncode}: {tail[0][:120]}); section left as it was", dt))
            continue
        if not self_writes:
            name = section or _existing_section_for(stem) or stem
            body = p.stdout.strip()
            if f"{stem}.py" not in body:
                body = f"Regenerate: `.venv/bin/python benchmarks/{stem}.py` (or `make bench`).\n\n" + body
            write_section(name, body)
        status.append((stem, "ok", dt))
    return status


# -- the full comparison -----------------------------------------------------------------------------


def full_comparison(args) -> str:
    import torch

    import pruning_core as pc
    from pruning_core.checkpoint import save_pruned
    from pruning_core.efficiency import measure_pair
    from pruning_core.evaluate import cached_lm_eval, metrics_record, run_lm_eval, stability
    from pruning_core.methods import list_methods
    from pruning_core.models import resolve_model_path
    from pruning_core.report import compare

    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = [t for t in args.tasks.split(",") if t]
    names = [m.name for m in list_methods()] if args.methods == "all" else args.methods.split(",")
    dense_path = resolve_model_path(args.model)
    dense, tok = pc.load_model(args.model, device=args.device)
    dev = next(dense.parameters()).device
    ev = pc.eval_tokens(tok)
    calib = pc.calibration_set(tok, n_samples=args.calib, seq_len=128, seed=0)
    eff_kw = dict(prompt_len=64, new_tokens=16, repeats=3)

    def evaluate(model, path) -> tuple[dict, dict | None]:
        ppl = pc.perplexity(model, ev, seq_len=256, max_windows=args.windows)
        lm = (run_lm_eval(str(path), tasks, limit=args.limit, device=str(dev)) if path is not None else
              cached_lm_eval(dense_path, tasks, limit=args.limit, device=str(dev))) if tasks else None
        return metrics_record(perplexity=ppl, lm_eval_results=lm), lm

    log(f"dense {args.model}: evaluating")
    t0 = time.perf_counter()
    before, dense_lm = evaluate(dense, None)
    p0 = pc.count_params(dense)
    log(f"dense done in {time.perf_counter() - t0:.0f} s")
    reports, failed = [], []
    for name in names:
        log(f"{name}: pruning {args.ratio:.0%}")
        t0 = time.perf_counter()
        try:
            model = copy.deepcopy(dense)
            pc.prune(model, name, calib, args.ratio, device=dev)
            t_prune = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as d:
                path = save_pruned(model, tok, None, Path(d) / name)
                after, lm = evaluate(model, path)
            # dense and pruned timed back to back (alternating), so load on a shared box hits both alike
            eff = measure_pair(dense, model, tok, rounds=2, **eff_kw)
            after["efficiency"] = eff["pruned"]
            p1 = pc.count_params(model)
            stab = stability(dense_lm["samples"], lm["samples"]) if lm and dense_lm else None
            reports.append({"name": f"{name}-{args.ratio}", "model": args.model, "method": name,
                            "target_ratio": args.ratio, "recovery": "none", "params_before": p0, "params_after": p1,
                            "removed_fraction": 1 - p1 / p0, "metrics_before": {**before, "efficiency": eff["dense"]},
                            "metrics_after": after,
                            "stability": stab, "timings": {"prune": t_prune}})
            log(f"{name}: done in {time.perf_counter() - t0:.0f} s, {p1 / 1e6:.1f} M params")
        except Exception as e:  # one failing method must not hide the others
            failed.append((name, f"{type(e).__name__}: {str(e)[:150]}"))
            log(f"{name}: FAILED {e}")
            traceback.print_exc(file=sys.stderr)
        finally:
            model = None
    md = [f"## Full comparison: every registered method at {args.ratio:.0%} on {args.model}", "",
          f"Regenerate: `.venv/bin/python benchmarks/run_all.py --only compare` (or `make bench`). "
          f"Calibration {args.calib} x 128 tokens of the training text; PPL: first {args.windows} windows of "
          f"256 tokens of the evaluation text; lm-eval: offline tasks {', '.join(tasks) or '-'} "
          f"(first {args.limit} items, 0-shot, pruned checkpoints evaluated by path); speed: greedy decode "
          f"(64-token prompt, 16 new tokens, median of 3 after warm-up; dense and pruned timed back to back, twice, for every row) on {dev}, {torch.get_num_threads()} thread(s). "
          f"Methods prune at their own default settings; `ratio` is each method's own target (per-layer units "
          f"for width methods, layers for depth methods), so compare the params column too. Stability: LLM-Streamline's "
          f"weighted agreement of per-item correctness with the dense model (lm-eval items).", ""]
    if reports:
        plot_dir = Path(tempfile.mkdtemp(prefix="pf-compare-")) if args.no_write else HERE / "plots" / "full_comparison"
        md.append(compare(reports, out_dir=plot_dir, link_base=None if args.no_write else HERE))
    md += ["", f"{args.limit} lm-eval items per task: one item is {100 / args.limit:.0f} points of accuracy, so small "
           "accuracy differences are noise; PPL and retention separate the methods better. Speed-up on a shared CPU "
           "at batch 1 is dominated by per-layer Python overhead, so width pruning shows little of it."]
    if failed:
        md += ["", "Methods that failed: " + "; ".join(f"`{n}` ({e})" for n, e in failed)]
    return "\n".join(md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["scripts", "compare"], default=None)
    ap.add_argument("--skip", default="", help="comma-separated script stems to skip (e.g. bench_capture)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per benchmark script")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="all")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--calib", type=int, default=8, help="calibration blocks of 128 tokens")
    ap.add_argument("--windows", type=int, default=8, help="PPL windows of 256 tokens")
    ap.add_argument("--limit", type=int, default=50, help="items per lm-eval task")
    ap.add_argument("--tasks", default="pydoc_next_sentence,pydoc_last_word")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default; 1 is ~5x faster on an oversubscribed 2-core box)")
    ap.add_argument("--no-write", action="store_true", help="print the comparison, leave RESULTS.md alone")
    args = ap.parse_args(argv)
    status = []
    if args.only in (None, "scripts"):
        status = run_scripts([s for s in args.skip.split(",") if s], args.timeout)
    if args.only in (None, "compare"):
        t0 = time.perf_counter()
        md = full_comparison(args)
        if not args.no_write:
            write_section(COMPARE_SECTION, md)
        status.append(("full comparison", "ok", time.perf_counter() - t0))
        print(md)
    print("\n| benchmark | status | seconds |\n|---|---|---|")
    for name, st, dt in status:
        print(f"| {name} | {st} | {dt:.0f} |")
    return 0 if all(st == "ok" for _, st, _ in status) else 1


if __name__ == "__main__":
    sys.exit(main())
