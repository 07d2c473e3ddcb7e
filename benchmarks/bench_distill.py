"""Recovery out of domain (issue 20): none, LoRA with cross-entropy, and distillation from the dense model.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_distill.py run --configs "slimgpt 20 %" \
        --recoveries none,lora-ce,distill-full --steps 40 --seeds 42,43,44 --threads 2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_distill.py table [--write]

Protocol: as `bench_ood.py` (calibration = random pydoc train windows, seeds 42/43/44; in-domain PPL on
pydoc eval, out-of-domain PPL on `pkgdocs`, non-overlapping 256-token windows, no BOS). The pruned model
of a (config, seed) is computed once and copied for each recovery.
- `lora-ce`: today's `recovery: lora` (peft r 8 on every projection, cross-entropy on pydoc's train split);
- `distill-<train>`: `recovery: distill` with `train: <train>`: KL to the dense model's top-k log-probs
  (the `teacher`, computed once per calibration seed) on the calibration blocks; `train` is full, decoder
  (embeddings and LM head frozen), lora or norms. `distill-<train>@samples` trains on `--samples` blocks the
  dense model samples from BOS instead, `distill-<train>@mix` on the calibration blocks plus `--mix` of them;
- `--steps` is the same for every recovery of a row (equal steps); equal wall time is read from the
  `--eval-every` curve (OOD PPL against training seconds), written beside each row.
Each row records training seconds, tokens/s, the process's peak RSS and the teacher's size. Rows append
to `--json` as they finish; a rerun skips finished rows.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_ood import Bench, _append, _row_spec  # noqa: E402

from pruning_core.distill import distill_recover, sample_from_teacher, teacher_topk  # noqa: E402

DEFAULT_JSON = HERE / ".bench_distill.json"
CONFIGS = {
    "slimgpt 20 %": dict(method="slimgpt", settings={}, ratio=0.2),
    "slimgpt 30 %": dict(method="slimgpt", settings={}, ratio=0.3),
    "flap 20 %": dict(method="flap", settings={}, ratio=0.2),
    "streamline 20 %": dict(method="llm-streamline", settings={}, ratio=0.2),
}


def _reset_peak_rss() -> None:
    """Linux: start the process's peak RSS (VmHWM) afresh, so each row reports its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _rss_mb() -> float:
    """Peak RSS since the last `_reset_peak_rss` (VmHWM), else since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class DistillBench(Bench):
    def __init__(self, a):
        super().__init__(a.model, a.id_windows, a.ood_windows, a.threads)
        self.a = a
        self._teacher: dict = {}
        self._pruned: dict = {}

    def teacher(self, seed: int, source: str = "") -> tuple[torch.Tensor, dict]:
        """(blocks, teacher) of a calibration seed: the calibration blocks; (`samples`) `--samples` NxL
        blocks the dense model samples from BOS (`source: teacher-samples`, sampling seed = the seed); or
        (`mix`) the calibration blocks followed by `--mix` such samples (`mix_samples`)."""
        key = (self.a.calib, seed, self.a.top_k, source, self.a.samples if source == "samples" else self.a.mix)
        if key not in self._teacher:
            t0 = time.perf_counter()
            if source == "samples":
                n, L = (int(x) for x in self.a.samples.split("x"))
                blocks = sample_from_teacher(self.model, n, L, seed=seed, batch_size=16)
            elif source == "mix":
                calib = self.calib(self.a.calib, seed)
                blocks = torch.cat([calib, sample_from_teacher(self.model, self.a.mix, calib.shape[1], seed=seed,
                                                               batch_size=16)])
            else:
                blocks = self.calib(self.a.calib, seed)
            t_sample = time.perf_counter() - t0
            t = teacher_topk(self.model, blocks, self.a.top_k, batch_size=4)
            t["seconds"] = time.perf_counter() - t0
            t["sample_seconds"] = t_sample if source else 0.0
            self._teacher = {key: (blocks, t)}
        return self._teacher[key]

    def pruned(self, config: str, seed: int):
        """The pruned model of (config, seed) (Streamline: with its trained replacement) and its row."""
        key = (config, seed)
        folder = HERE / ".bench_distill_models" / f"{config.replace(' ', '').replace('%', 'pct')}-{self.a.calib}-s{seed}"
        if key not in self._pruned and (folder / "row.json").exists():  # pruned by an earlier (or parallel) run
            from pruning_core.checkpoint import load_pruned

            self._pruned = {key: (load_pruned(folder)[0], json.loads((folder / "row.json").read_text()))}
        if key not in self._pruned:
            from pruning_core.checkpoint import save_pruned

            row = self.run_row(config, _row_spec(dict(CONFIGS[config], calib=self.a.calib)), seed, 0)
            save_pruned(self.last_model, self.tok, None, folder)
            (folder / "row.json").write_text(json.dumps(row))
            self._pruned = {key: (self.last_model, row)}
        m, row = self._pruned[key]
        return copy.deepcopy(m), dict(row)

    def recover(self, config: str, recovery: str, seed: int) -> dict:
        m, before = self.pruned(config, seed)
        row = dict(before=dict(ppl_id=before["ppl_id"], ppl_ood=before["ppl_ood"]), params=before["params"],
                   prune_s=before["prune_s"])
        if recovery == "none":
            return row | {k: before[k] for k in ("ppl_id", "ppl_ood")}
        curve: list[dict] = []
        _reset_peak_rss()  # this row's training, not the rows or the pruning before it
        t_start = [time.perf_counter()]

        def progress(step, steps, loss):
            if self.a.eval_every and step % self.a.eval_every == 0 and step < steps:
                t_eval = time.perf_counter()
                net.eval()
                with torch.no_grad():
                    from pruning_core.metrics import perplexity

                    ppl = perplexity(net, self.ood_ids, 256, self.ood_windows, batch_size=4)["ppl"]
                net.train()
                curve.append(dict(step=step, seconds=t_eval - t_start[0], ppl_ood=ppl, loss=loss))
                t_start[0] += time.perf_counter() - t_eval  # evaluation time is not training time

        net = m
        if recovery == "lora-ce":
            from pruning_core.data import load_text, tokenize_text
            from pruning_core.recover import lora_recover

            train = tokenize_text(self.tok, load_text("pydoc", "train"))
            m, info = lora_recover(m, self.tok, train, {"rank": 8, "steps": self.a.steps, "seed": seed},
                                   progress=progress)
        else:
            kind, _, source = recovery.partition("@")
            blocks, t = self.teacher(seed, source)
            train = kind.removeprefix("distill-")
            settings = {"train": train, "steps": self.a.steps, "seed": seed, "lr": self.a.lr,
                        "batch_size": self.a.batch_size}
            if train == "lora":
                settings["lr"] = self.a.lora_lr
            row["teacher_s"] = t["seconds"]
            row["sample_s"] = t["sample_seconds"]
            m, info = distill_recover(m, blocks, t, settings, progress=progress)
            row["teacher_bytes"] = info["teacher_bytes"]
            row["kept_mass"] = info["kept_mass"]
        row |= dict(recover_s=info["seconds"], tokens_per_s=info.get("tokens_per_s") or
                    self.a.steps * 4 * 256 / info["seconds"], curve=curve, peak_rss_mb=_rss_mb(),
                    trainable=info.get("trainable_params"))
        row |= {k: v for k, v in self.evaluate(m, 0).items() if k in ("ppl_id", "ppl_ood")}
        return row


def run(a) -> None:
    path = Path(a.json)
    rows = json.loads(path.read_text()) if path.exists() else []
    done = {(r["config"], r["recovery"], r["seed"], r["steps"], r.get("lr")) for r in rows}
    bench = None
    for seed in [int(s) for s in a.seeds.split(",")]:
        for config in [c.strip() for c in a.configs.split("|")]:
            for rec in a.recoveries.split(","):
                steps = 0 if rec == "none" else a.steps
                lr = 2e-4 if rec == "lora-ce" else a.lora_lr if rec.startswith("distill-lora") else a.lr
                if (config, rec, seed, steps, lr if steps else a.lr) in done or (rec == "none" and any(
                        d[:4] == (config, rec, seed, 0) for d in done)):
                    continue
                bench = bench or DistillBench(a)
                t0 = time.perf_counter()
                row = bench.recover(config, rec, seed)
                row |= dict(config=config, recovery=rec, seed=seed, steps=steps, lr=lr if steps else a.lr,
                            calib=a.calib, wall_s=time.perf_counter() - t0, id_windows=a.id_windows,
                            ood_windows=a.ood_windows, top_k=a.top_k)
                _append(path, row)
                print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    print(table(json.loads(path.read_text())))


def _agg(vals, fmt="{:.2f}") -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} [{fmt.format(min(vals))}, {fmt.format(max(vals))}]"


def table(rows: list[dict]) -> str:
    head = ["config", "recovery", "steps", "lr", "seeds", "ID PPL", "OOD PPL", "OOD PPL before", "train s", "tokens/s",
            "peak RSS MB", "teacher MB (kept mass)", "teacher s (of it sampling)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["config"], r["recovery"], r["steps"], r.get("lr") if r["steps"] else None), []).append(r)
    for (config, rec, steps, lr), rs in groups.items():
        tb = [r.get("teacher_bytes") for r in rs if r.get("teacher_bytes")]
        km = [r.get("kept_mass") for r in rs if r.get("kept_mass")]
        out.append("| " + " | ".join([
            config, rec, str(steps), f"{lr:g}" if lr else "–", ",".join(str(r["seed"]) for r in rs), _agg([r["ppl_id"] for r in rs]),
            _agg([r["ppl_ood"] for r in rs]), _agg([r["before"]["ppl_ood"] for r in rs]),
            _agg([r.get("recover_s") for r in rs], "{:.0f}"), _agg([r.get("tokens_per_s") for r in rs], "{:.0f}"),
            _agg([r.get("peak_rss_mb") for r in rs], "{:.0f}"),
            (f"{tb[0] / 2**20:.1f} ({statistics.mean(km):.3f})" if tb else "–"),
            (_agg([r.get("teacher_s") for r in rs], "{:.0f}") + " (" + _agg([r.get("sample_s") for r in rs], "{:.0f}")
             + ")") if any(r.get("teacher_s") for r in rs) else "–"]) + " |")
    curves = [r for r in rows if r.get("curve")]
    if curves:
        out.append("\nOOD PPL along training (equal wall time): " + "; ".join(
            f"{r['config']} {r['recovery']} s{r['seed']}: " + ", ".join(
                f"{c['seconds']:.0f}s→{c['ppl_ood']:.1f}" for c in r["curve"]) for r in curves))
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", nargs="?", default="run", choices=("run", "table"))
    ap.add_argument("--configs", default="slimgpt 20 %", help="'|'-separated: " + " | ".join(CONFIGS))
    ap.add_argument("--recoveries", default="none,lora-ce,distill-full")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=5e-5, help="peak lr of distill-full / distill-norms")
    ap.add_argument("--lora-lr", type=float, default=2e-4, help="peak lr of distill-lora")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--calib", default="64x256", help="calibration = distillation blocks, NxL")
    ap.add_argument("--samples", default="32x256", help="distill-<train>@samples: NxL blocks sampled from the "
                    "dense model (source: teacher-samples)")
    ap.add_argument("--mix", type=int, default=64, help="distill-<train>@mix: the calibration blocks plus this "
                    "many blocks sampled from the dense model (mix_samples)")
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--id-windows", type=int, default=8)
    ap.add_argument("--ood-windows", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=0, help="OOD PPL every N training steps (a curve)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(DEFAULT_JSON))
    ap.add_argument("--write", action="store_true", help="with `table`: write its RESULTS.md section")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        run(a)
        return
    text = table(json.loads(Path(a.json).read_text()))
    print(text)
    if a.write:
        from run_all import write_section

        write_section("distill", "## Recovery out of domain: distillation from the dense model (issue 20)\n\n"
                      + __doc__.split("\n\n", 1)[1] + "\n" + text)


if __name__ == "__main__":  # offline: the model and texts ship with the packages
    os.environ.update({k: os.environ.get(k, "1") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")})
    main()
