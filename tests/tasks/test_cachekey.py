"""Cache keys see code through imports and library versions; a miss says why."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import cachekey
from tasks.cachekey import KeyParts, code_parts, explain_miss, format_reason

REPO = Path(__file__).resolve().parents[2]

PRUNE_PARAMS = {"model": {"sha256": "m" * 64}, "settings": {}, "ratio": 0.2, "scores": None, "calib": {"sha256": "c" * 64}}

_KEYS = """
import json, sys
from tasks import steps  # registers the steps
from tasks.common import STEPS
p = json.loads(sys.argv[1])
print(json.dumps({m: STEPS["prune"].key({**p, "method": m}) for m in ("wanda", "slimgpt", "flap", "llm-rank")}))
"""


def _prune_keys(root: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _KEYS, json.dumps(PRUNE_PARAMS)], cwd=root, capture_output=True,
                         text=True, timeout=120, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin",
                                                      "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_editing_obs_misses_slimgpt_prune_and_hits_flap_and_wanda(tmp_path):
    """A real edit of pruning_core/obs.py, in a copy of the project: only the method that imports it
    (SlimGPT) gets a new prune key; FLAP shares SlimGPT's schedule solver through select.py, not obs."""
    copy = tmp_path / "repo"
    for top in ("pruning_core", "tasks", "flows"):
        shutil.copytree(REPO / top, copy / top, ignore=shutil.ignore_patterns("__pycache__"))
    before = _prune_keys(copy)
    with open(copy / "pruning_core" / "obs.py", "a") as f:
        f.write("\n# an edit\n")
    after = _prune_keys(copy)
    assert after["slimgpt"] != before["slimgpt"]
    assert after["flap"] == before["flap"] and after["wanda"] == before["wanda"]
    assert after["llm-rank"] == before["llm-rank"]


def test_closure_is_computed_not_listed():
    from tasks import steps  # noqa: F401
    from tasks.common import STEPS

    wanda = code_parts(*STEPS["prune"].code({"method": "wanda"}))
    slim = code_parts(*STEPS["prune"].code({"method": "slimgpt"}))
    # reached only through imports: the step names neither obs (slimgpt -> obs) nor adapters (select -> adapters)
    assert "pruning_core.obs" in slim and "pruning_core.obs" not in wanda
    assert "pruning_core.adapters" in wanda and "pruning_core.plan" in wanda
    # function-level imports count (prune_task imports surgery and checkpoint inside its body)
    assert {"pruning_core.surgery", "pruning_core.checkpoint"} <= set(wanda)
    # the task's own module counts function by function: evaluate_task is not part of prune's code
    assert "tasks.steps:prune_task" in wanda and "tasks.steps:evaluate_task" not in wanda


def test_a_library_version_changes_every_step_key(monkeypatch, tiny_llama_dir):
    from tasks import steps  # noqa: F401
    from tasks.common import STEPS

    m = {"sha256": "m" * 64, "uri": str(tiny_llama_dir)}
    params = {
        "load": {"ref": str(tiny_llama_dir), "dtype": "float32"},
        "calibration": {"model": m, "source": "pydoc", "n_samples": 4, "seq_len": 32, "seed": 0},
        "capture": {"model": m, "calib": m, "requests": ["norms"], "batch_size": 8},
        "score": {"model": m, "stats": m, "method": "wanda", "settings": {}},
        "prune": {**PRUNE_PARAMS, "method": "wanda"},
        "recover": {"checkpoint": m, "kind": "lora", "settings": {}, "model_revision": "r", "calib": m},
        "evaluate": {"target": m, "settings": {"ppl_seq_len": 32}, "model_revision": "r"},
        "export": {"checkpoint": m, "fmt": "vllm", "model_revision": "r"},
        "teacher": {"model": m, "blocks": m, "top_k": 64, "dtype": "float16"},
        "teacher_samples": {"model": m, "n_samples": 4, "seq_len": 32, "seed": 0, "temperature": 1.0,
                            "batch_size": 16},
        "layer_tables": {"model": m, "calib": m, "method": "slimgpt", "settings": {"gqa": "per_group"}},
        "concat_blocks": {"parts": [m, {"sha256": "s" * 64}]},
    }
    assert set(params) == set(STEPS)
    before = {s: STEPS[s].key(p) for s, p in params.items()}
    real = cachekey._dist_version
    monkeypatch.setattr(cachekey, "_dist_version", lambda n: "99.0" if n == "transformers" else real(n))
    after = {s: STEPS[s].key(p) for s, p in params.items()}
    assert all(after[s] != before[s] for s in params)
    # and only the libraries a step uses: peft is part of recover's key, not of capture's
    monkeypatch.setattr(cachekey, "_dist_version", lambda n: "99.0" if n == "peft" else real(n))
    peft = {s: STEPS[s].key(p) for s, p in params.items()}
    assert peft["recover"] != before["recover"] and peft["capture"] == before["capture"]


def test_explain_miss_names_the_new_part():
    old = KeyParts("prune", {"ratio": 0.2, "settings": {"gqa": "kv_group"}}, ["a"], "r", {"pruning_core.obs": "1"},
                   {"transformers": "5.23.0"})
    assert explain_miss([], old)["reason"].startswith("first run")
    new = KeyParts(**{**old.__dict__, "settings": {"ratio": 0.3, "settings": {"gqa": "kv_group"}}})
    why = explain_miss([old.summary()], new)
    assert why["changed"] == {"settings": ["ratio: 0.2 -> 0.3"]}
    new = KeyParts(**{**old.__dict__, "code": {"pruning_core.obs": "2"}, "libraries": {"transformers": "5.24.0"}})
    why = explain_miss([old.summary()], new)
    assert why["changed"] == {"code": ["pruning_core/obs.py"], "library version": ["transformers 5.23.0 -> 5.24.0"]}
    assert "pruning_core/obs.py" in format_reason(why) and "transformers 5.23.0 -> 5.24.0" in format_reason(why)
    # the closest earlier record explains it: one settings change beats a code + library change
    other = KeyParts(**{**old.__dict__, "code": {"pruning_core.obs": "9"}, "libraries": {"transformers": "1"}})
    why = explain_miss([other.summary(), old.summary()], KeyParts(**{**old.__dict__, "inputs": ["b"]}))
    assert list(why["changed"]) == ["input artifact"]
    assert explain_miss([old.summary()], old)["reason"] == "the cached artifact was missing or corrupt"


@pytest.mark.parametrize("mod", ["tasks.steps", "flows.compress", "pruning_core.methods.slimgpt"])
def test_closure_of_real_modules_stays_inside_the_project(mod):
    parts = cachekey.module_closure([mod])
    assert mod in parts and all(k.split(".")[0] in cachekey.PROJECT for k in parts)


def test_efficiency_timings_key_on_the_runs_placement():
    """tokens/s and peak memory differ between placements: the evaluate key follows the run's placement
    when efficiency is measured, and not otherwise (perplexity is the same under every placement)."""
    from tasks.steps import _eval_keyparts

    def parts(placement, efficiency):
        return _eval_keyparts({"ctx": {"device": "cpu", "placement": placement}, "target": {"sha256": "t" * 64},
                               "model_revision": "m", "settings": {"source": "pydoc", "efficiency": efficiency}})[0]

    assert parts("device", True)["efficiency_placement"] == "device"
    assert parts("device", True) != parts("offload", True)
    assert parts("device", False) == parts("disk", False)
