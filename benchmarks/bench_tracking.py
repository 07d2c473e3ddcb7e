"""MLflow tracking, model logging and gated promotion: what they cost, on a tiny random Llama.

    .venv/bin/python benchmarks/bench_tracking.py [--races 5]

Prints Markdown tables: seconds per operation against a fresh SQLite store in a temporary folder
(tracking a run with / without its model, uniform = transformers flavour, non-uniform = pyfunc with the
project's loader; loading the model back and generating), the latency of one promotion, and how often
two racing promotions end with `champion` on the better model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
for k, v in {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
    os.environ.setdefault(k, v)

SECTION = "mlflow-tracking"


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "[EOS]"] + [f"w{i}" for i in range(125)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def _run_dir(root: Path, uniform: bool) -> Path:
    from pruning_core.checkpoint import save_pruned
    from pruning_core.models import tiny_model
    from pruning_core.plan import LayerPlan, PrunePlan
    from pruning_core.surgery import apply_plan

    m = tiny_model("llama", n_layers=4)
    lps = [LayerPlan(i, ffn=list(range(48))) for i in range(4)]
    if not uniform:
        lps[1] = LayerPlan(1, heads=[0, 1], kv_heads=[0])
    plan = PrunePlan("l1", {}, lps)
    apply_plan(m, plan)
    rd = root / ("uniform" if uniform else "nonuniform")
    save_pruned(m, _tokenizer(), plan, rd / "checkpoint")
    return rd


def _report(rd: Path, ppl: float = 12.0) -> dict:
    return {"model": "tiny-llama", "method": "l1", "target_ratio": 0.3, "params_before": 1000, "params_after": 700,
            "metrics_before": {"ppl": 10.0, "t.acc,none": 0.5}, "metrics_after": {"ppl": ppl, "t.acc,none": 0.47},
            "timings": {"capture": 1.0, "score": 0.2}, "cache": {"capture": "miss", "score": "miss"},
            "artifacts": {"checkpoint": str(rd / "checkpoint")}}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--races", type=int, default=5)
    args = ap.parse_args()
    import mlflow
    from mlflow.tracking import MlflowClient

    from flows.promote import CHAMPION, promote_version
    from tasks.tracking import track_compress_run, version_tags

    rows = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        spec = {"tracking": {"uri": uri, "log_model": False}}
        _, t = timed(lambda: MlflowClient(uri, uri).search_experiments())
        rows.append(("create the SQLite store (schema migrations)", t))
        uni, non = _run_dir(root, True), _run_dir(root, False)
        _, t = timed(lambda: track_compress_run(spec, _report(uni), uni))
        rows.append(("track a run: parent + 2 children, metrics, plots (no model)", t))
        spec["tracking"]["log_model"] = True
        ru, t = timed(lambda: track_compress_run(spec, _report(uni), uni))
        rows.append(("... + log and register the uniform checkpoint (transformers flavour)", t))
        rn, t = timed(lambda: track_compress_run(spec, _report(non), non))
        rows.append(("... + log and register the non-uniform checkpoint (pyfunc, project loader)", t))
        os.environ["MLFLOW_TRACKING_URI"] = uri
        for label, r in (("uniform", ru), ("non-uniform", rn)):
            pm, t = timed(lambda r=r: mlflow.pyfunc.load_model(f"models:/{r['model_name']}/{r['model_version']}"))
            rows.append((f"mlflow.pyfunc.load_model ({label})", t))
            out, t = timed(lambda pm=pm: pm.predict(["w1 w2 w3"]))
            rows.append((f"predict 1 prompt, 32 new tokens ({label}): {json.dumps(out[0][:40])}", t))
        _, t = timed(lambda: promote_version(ru["model_name"], ru["model_version"], {"min_acc_retention": 0.9}, uri))
        rows.append(("promote one version (challenger, gate tags, champion election)", t))
        c = MlflowClient(uri, uri)
        ok, race_t = 0, []
        for rep in range(args.races):
            name = f"race-{rep}"
            c.create_registered_model(name)
            good, bad = (c.create_model_version(name, source=str(uni / "checkpoint"),
                                                tags=version_tags(_report(uni, ppl))).version for ppl in (11.0, 12.0))
            barrier = threading.Barrier(2)

            def go(v, name=name, barrier=barrier):
                barrier.wait()
                promote_version(name, v, {"min_acc_retention": 0.9}, uri, settle_s=0.01)

            ts = [threading.Thread(target=go, args=(v,)) for v in ((good, bad) if rep % 2 else (bad, good))]
            t0 = time.perf_counter()
            for th in ts:
                th.start()
            for th in ts:
                th.join()
            race_t.append(time.perf_counter() - t0)
            ok += str(c.get_model_version_by_alias(name, CHAMPION).version) == str(good)
    print(f"tiny random Llama (4 layers, hidden 64); SQLite store in a temp folder; "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print("| operation | seconds |\n|---|---|")
    for label, t in rows:
        print(f"| {label} | {t:.2f} |")
    print(f"\n| two promotions racing (better and worse candidate, both pass the gate) | result |\n|---|---|\n"
          f"| champion ends on the better model | {ok}/{args.races} |\n"
          f"| wall time of a race, median | {sorted(race_t)[len(race_t) // 2]:.2f} s |")


if __name__ == "__main__":
    main()
