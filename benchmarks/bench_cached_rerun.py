"""Bytes read by the cache checks of a fully cached rerun, on an 8B-shaped bf16 model and checkpoint.

    .venv/bin/python benchmarks/bench_cached_rerun.py [--shape 8b] [--layers 2] [--keep DIR]

Two random bf16 Llamas with 8B-shaped layers (`bench_scale.write_random_llama`) are written: the dense
model (a local folder, the `load` step's input) and a checkpoint committed to a local store (the `prune`
step's output, `put_dir(move=True)` as the prune step does). A first process computes the load key (the
dense folder's content digest). Then a fresh process does what a fully cached rerun does with them —
the load key and its record check (`model_valid`), the checkpoint's cache check (`valid`, once for
Prefect's key function and once in `run_step`) and the report's read of its plan (`local_path`) — and
reports what it read from /proc/self/io: `rchar` (every byte read(2) returned, page cache included)
and `read_bytes` (what reached the disk). `--full` adds `pruneflow verify`'s full re-hash for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _io() -> dict[str, int]:
    return {k: int(v) for k, v in (ln.split(": ") for ln in Path("/proc/self/io").read_text().splitlines())}


def child(mode: str, dense: str, store_url: str, man_json: str) -> None:
    from pruning_core.models import model_revision
    from tasks import steps  # noqa: F401 - registers the steps
    from tasks.cachekey import code_parts, library_versions
    from tasks.common import STEPS, model_valid
    from tasks.store import ArtifactStore

    man = json.loads(man_json)
    load_params = {"ctx": {"device": "cpu"}, "ref": dense, "dtype": "bfloat16"}
    # the parts of a key that are not the model (project sources, library metadata) read a few MB of
    # .py files whatever the model: done first, so that the figures below are the model's own reads
    code_parts(*STEPS["load"].code(load_params))
    library_versions(STEPS["load"].libraries)
    before = _io()
    STEPS["load"].key(load_params)

    model_ok = model_valid({"uri": dense, "fingerprint": model_revision(dense)})
    mid = _io()
    store = ArtifactStore(store_url)
    ok = store.valid(man) and store.valid(man)
    plan = (store.local_path(man) / "config.json").exists()
    after = _io()
    out = {"model_ok": model_ok, "ckpt_ok": ok and plan,
           "dense": {k: mid[k] - before[k] for k in ("rchar", "read_bytes")},
           "checkpoint": {k: after[k] - mid[k] for k in ("rchar", "read_bytes")}}
    if mode == "full":
        t0 = _io()
        store.verify(man)
        out["verify"] = {k: _io()[k] - t0[k] for k in ("rchar", "read_bytes")}
    print(json.dumps(out))


def _run(args: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", nargs="?", default="bench")
    ap.add_argument("args", nargs="*")
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="also time a full re-hash (pruneflow verify)")
    ap.add_argument("--keep", default=None, help="parent folder of the temporary files")
    a = ap.parse_args()
    if a.mode in ("child", "full"):
        child(a.mode, *a.args)
        return
    from bench_scale import write_random_llama

    from tasks.store import ArtifactStore

    with tempfile.TemporaryDirectory(prefix="bench-cached-rerun-", dir=a.keep) as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "PRUNEFLOW_HOME": str(tmp / "home")}
        os.environ["PRUNEFLOW_HOME"] = env["PRUNEFLOW_HOME"]
        dense_bytes = write_random_llama(tmp / "dense", a.shape, a.layers, seed=0)
        write_random_llama(tmp / "checkpoint", a.shape, a.layers, seed=1)
        man = ArtifactStore(str(tmp / "store")).put_dir(tmp / "checkpoint", "checkpoint", "prune:bench", move=True)
        time.sleep(2.5)  # older than digest.RACY_S, as any file a later run reads
        args = [str(tmp / "dense"), str(tmp / "store"), json.dumps(man)]
        first = _run(["child", *args], env)  # the first run: computes and remembers the dense folder's digest
        rerun = _run(["full" if a.full else "child", *args], env)
        assert rerun["model_ok"] and rerun["ckpt_ok"]
        print(f"| {a.shape}-shaped, {a.layers} layers, bf16 | bytes | first run: rchar | rerun: rchar | rerun: read_bytes "
              "| rerun reads, % of bytes |")
        print("|---|---|---|---|---|---|")
        print(f"| dense model folder (load key) | {dense_bytes / 2**30:.2f} GiB | {first['dense']['rchar'] / 2**20:.0f} MiB "
              f"| {rerun['dense']['rchar'] / 2**20:.2f} MiB | {rerun['dense']['read_bytes'] / 2**20:.2f} MiB "
              f"| {100 * rerun['dense']['rchar'] / dense_bytes:.3f} % |")
        print(f"| checkpoint in the store (valid x2, local_path) | {man['bytes'] / 2**30:.2f} GiB "
              f"| {first['checkpoint']['rchar'] / 2**20:.2f} MiB | {rerun['checkpoint']['rchar'] / 2**20:.2f} MiB "
              f"| {rerun['checkpoint']['read_bytes'] / 2**20:.2f} MiB | **{100 * rerun['checkpoint']['rchar'] / man['bytes']:.3f} %** |")
        if a.full:
            print(f"| full re-hash (`pruneflow verify`) | | | {rerun['verify']['rchar'] / 2**20:.0f} MiB | "
                  f"{rerun['verify']['read_bytes'] / 2**20:.0f} MiB | {100 * rerun['verify']['rchar'] / man['bytes']:.0f} % |")


if __name__ == "__main__":
    main()
