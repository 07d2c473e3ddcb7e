"""Evaluation with lm-evaluation-harness, the stability metric and retention.

* `run_lm_eval(model_or_path, tasks)` evaluates a *saved* checkpoint by path (loaded through
  `checkpoint.load_pruned`, so non-uniform checkpoints work) or, for quick checks, an in-memory model
  with its tokenizer. Offline tasks (`offline_tasks()`, built from the default text's eval split,
  see `pruning_core/evaltasks`) are found with `TaskManager(include_path=..., include_defaults=False)`;
  the standard tasks (`STANDARD_TASKS`) are used by name only when the hub is reachable.
  Multiple-choice tasks keep both `acc` and `acc_norm`; per-sample outputs are kept for `stability`.
* Perplexity protocols, each named where it is reported: `fixed_window_256` (non-overlapping
  256-token windows of the eval text, the SparseGPT/Wanda protocol, `metrics.perplexity`) and
  `lm_eval_rolling_word` (lm-eval's rolling log-likelihood, word perplexity, task `pydoc_rolling`).
* `stability(dense_samples, pruned_samples)`: LLM-Streamline §3 (see its docstring).
* `retention(before, after)`: after / before per metric (inverted for lower-is-better metrics).
* `cached_lm_eval(path, tasks, ...)`: dense-model results cached once per model and task set.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, DataError

STANDARD_TASKS = ("wikitext", "boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
ROLLING_PROTOCOL = "lm_eval_rolling_word"
FIXED_PROTOCOL = "fixed_window_256"
LOWER_IS_BETTER = ("ppl", "perplexity", "bits_per_byte", "loss", "_ms", "mem_mb")
# efficiency figures: reported with their ratio, but not part of the quality "average"
EFFICIENCY_KEYS = ("prefill_ms", "decode_tokens_per_s", "peak_mem_mb", "eval_tokens_per_s")


def offline_tasks() -> list[str]:
    """The lm-eval tasks shipped with the package (they need no network)."""
    from .evaltasks import TASKS

    return list(TASKS)


def hub_reachable() -> bool:
    """False when the user has put the hub offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE = 1)."""
    return not any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def check_tasks(tasks: list[str]) -> list[str]:
    """Validate task names; standard tasks while offline are a DataError naming the task."""
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks:
        raise ConfigError("evaluation.tasks", tasks, "a non-empty list of: " + ", ".join(offline_tasks() + list(STANDARD_TASKS)))
    offline = offline_tasks()
    for t in tasks:
        if t in offline:
            continue
        if t in STANDARD_TASKS:
            if not hub_reachable():
                raise DataError("evaluation.tasks", t, "offline tasks " + ", ".join(offline),
                                "the hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE=1); standard tasks need it")
            continue
        raise ConfigError("evaluation.tasks", t, ", ".join(offline + list(STANDARD_TASKS)))
    return list(tasks)


def _task_manager(tasks: list[str]):
    from lm_eval.tasks import TaskManager

    from .evaltasks import TASK_DIR

    only_offline = all(t in offline_tasks() for t in tasks)
    # include_defaults=False skips indexing every built-in YAML (4.9 s) when only ours are needed
    return TaskManager(include_path=str(TASK_DIR), include_defaults=not only_offline)


def _load(model_or_path, tokenizer, device: str):
    if isinstance(model_or_path, (str, Path)):
        from .checkpoint import load_pruned
        from .models import resolve_device

        model, tok = load_pruned(model_or_path, device=resolve_device(device))
        if tok is None:
            raise DataError("model", str(model_or_path), "a checkpoint folder that includes its tokenizer")
        return model, tok
    if isinstance(model_or_path, tuple):
        return model_or_path
    if tokenizer is None:
        raise ConfigError("tokenizer", None, "a tokenizer when an in-memory model is evaluated (or pass a checkpoint path)")
    return model_or_path, tokenizer


def _strip(metrics: dict) -> dict[str, float]:
    """lm-eval's `{"acc,none": v, "acc_stderr,none": s, "alias": ...}` -> `{"acc": v}`."""
    out = {}
    for k, v in metrics.items():
        name = k.split(",")[0]
        if name.endswith("_stderr") or name in ("alias", "sample_len") or not isinstance(v, (int, float)):
            continue
        out[name] = float(v)
    return out


def _n_tokens(tokenizer, text: str) -> int:
    return max(1, len(tokenizer(text, add_special_tokens=False)["input_ids"]))


def _sample_record(s: dict, output_type: str, tokenizer) -> dict:
    """One per-sample output: option_nll is the mean token NLL of each option (OpenCompass PPL mode)."""
    resps = s["filtered_resps"]
    args = s["arguments"]
    if output_type == "loglikelihood_rolling":
        ll = float(resps[0]) if not isinstance(resps[0], (list, tuple)) else float(resps[0][0])
        return {"doc_id": s["doc_id"], "target": None, "option_nll": [-ll], "pred": None, "correct": None}
    lls = [float(r[0]) for r in resps]
    conts = [a[1] if isinstance(a, (list, tuple)) else a["arg_1"] for a in args]
    nll = [-ll / _n_tokens(tokenizer, c) for ll, c in zip(lls, conts)]
    if output_type == "multiple_choice":
        pred = max(range(len(lls)), key=lambda j: lls[j])
        correct = bool(s.get("acc", pred == s["target"]))
        rec = {"doc_id": s["doc_id"], "target": s["target"], "option_nll": nll, "pred": pred, "correct": correct}
        if "acc_norm" in s:
            rec["correct_norm"] = bool(s["acc_norm"])
        return rec
    greedy = bool(resps[0][1])  # loglikelihood: (ll, is_greedy)
    return {"doc_id": s["doc_id"], "target": s["target"], "option_nll": nll, "pred": 0 if greedy else None, "correct": greedy}


def run_lm_eval(
    model_or_path,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    num_fewshot: int = 0,
    tokenizer=None,
    max_length: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """lm-eval results of a checkpoint folder (preferred) or an in-memory model (+ `tokenizer`).

    Returns `{"results": {task: {metric: value}}, "samples": {task: [{"doc_id", "target",
    "option_nll", "pred", "correct"}...]}, "versions": {...}, "protocols": {task: name}}`.
    """
    tasks = check_tasks(tasks)
    if limit is not None and limit < 1:
        raise ConfigError("evaluation.limit", limit, "None or an integer >= 1")
    model, tok = _load(model_or_path, tokenizer, device)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    if max_length is None:
        max_length = min(int(getattr(model.config, "max_position_embeddings", 2048) or 2048), 2048)
    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=max_length)
    try:
        res = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=_task_manager(tasks), num_fewshot=num_fewshot, limit=limit,
            log_samples=True, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except (ConnectionError, OSError) as e:  # a standard task whose dataset cannot be fetched
        raise DataError("evaluation.tasks", ",".join(tasks), "tasks whose data can be loaded", str(e)[:160]) from None
    finally:
        model.train(was_training)
    out_types = {t: cfg.get("output_type", "") for t, cfg in res.get("configs", {}).items()}
    results = {t: _strip(m) for t, m in res["results"].items() if t in tasks}
    samples = {
        t: [_sample_record(s, out_types.get(t, ""), tok) for s in res.get("samples", {}).get(t, [])] for t in tasks
    }
    protocols = {t: ROLLING_PROTOCOL for t in tasks if out_types.get(t) == "loglikelihood_rolling"}
    versions = {"lm_eval": getattr(lm_eval, "__version__", "unknown"), **{t: v for t, v in res.get("versions", {}).items()}}
    return {"results": results, "samples": samples, "versions": versions, "protocols": protocols,
            "n_samples": {t: len(v) for t, v in samples.items()}}


def cached_lm_eval(path: str | Path, tasks: list[str], cache_dir: str | Path | None = None, revision: str | None = None,
                   **kwargs) -> dict[str, Any]:
    """`run_lm_eval` of a checkpoint folder, cached on disk by (model revision, tasks, limit, shots).

    Used for the dense model: its results are computed once per model and task set, then every
    pruned run's retention is taken against them.
    """
    from .evaltasks import SEED
    from .models import home, model_revision

    tasks = check_tasks(tasks)
    rev = revision or model_revision(path)
    key_src = json.dumps({"rev": rev, "tasks": sorted(tasks), "limit": kwargs.get("limit"),
                          "shots": kwargs.get("num_fewshot", 0), "taskset_seed": SEED, "v": 1}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
    folder = Path(cache_dir) if cache_dir else home() / "eval_cache"
    f = folder / f"{key}.json"
    if f.exists():
        try:
            out = json.loads(f.read_text())
            out["cache"] = "hit"
            return out
        except (OSError, json.JSONDecodeError):
            pass  # corrupt: recompute
    out = run_lm_eval(str(path), tasks, **kwargs)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, f)
    out["cache"] = "miss"
    return out


# -- stability ----------------------------------------------------------------------------------


def _stability_one(dense: list[dict], pruned: list[dict]) -> float | None:
    by_id = {s["doc_id"]: s for s in pruned}
    sig, agree = [], []
    for d in dense:
        p = by_id.get(d["doc_id"])
        if p is None or d.get("correct") is None or p.get("correct") is None:
            continue
        sig.append(float(torch.tensor(d["option_nll"], dtype=torch.float64).std(unbiased=False)))
        agree.append(1.0 if bool(d["correct"]) == bool(p["correct"]) else 0.0)
    if not sig:
        return None
    w = torch.softmax(torch.tensor(sig, dtype=torch.float64), dim=0)
    return float((w * torch.tensor(agree, dtype=torch.float64)).sum())


def stability(dense_samples, pruned_samples) -> float:
    """LLM-Streamline's stability metric (Chen et al., ICLR 2025, arXiv 2403.19135), as a fraction in [0, 1].

    For item i of a dataset: sigma_i = standard deviation (population, over options j) of the
    *dense* model's per-option mean token loss (`option_nll`); w = softmax over items of sigma;
    c_i = 1 when dense and pruned are both correct or both wrong. Stability = sum_i w_i c_i.
    Items are matched by `doc_id` (the released script's bug - summing the first M weights in file
    order, M the number of matches - is *not* reproduced).

    Accepts one dataset (lists of per-sample records) or `{task: [records]}` for several; then the
    unweighted mean over tasks that have scorable items (rolling-perplexity tasks have none).
    """
    if isinstance(dense_samples, dict):
        vals = [v for t in dense_samples if t in pruned_samples
                for v in [_stability_one(dense_samples[t], pruned_samples[t])] if v is not None]
        if not vals:
            raise DataError("samples", sorted(dense_samples), "per-sample outputs of at least one multiple-choice or cloze task")
        return sum(vals) / len(vals)
    v = _stability_one(list(dense_samples), list(pruned_samples))
    if v is None:
        raise DataError("samples", len(dense_samples), "dense and pruned samples sharing doc_ids with a correctness flag")
    return v


# -- metrics records and retention ----------------------------------------------------------------


KNOWN_METRICS = ("acc", "acc_norm", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
# bookkeeping numbers that are not quality metrics (never compared, never averaged)
NOT_METRICS = ("params", "flops_per_token", "weights_mb", "ppl_tokens", "tokens", "windows", "sample_len", "nll",
               "n_samples")


def _canonical(key: str) -> str:
    """`eff.prefill_ms` -> `prefill_ms`; `task.acc` / `task,acc` -> `task/acc`."""
    if key.startswith("eff."):
        key = key[4:]
    for sep in (".", ","):
        head, _, tail = key.rpartition(sep)
        if head and tail in KNOWN_METRICS and not key.startswith("ppl."):
            return f"{head}/{tail}"
    return key


def flatten_metrics(m: dict | None) -> dict[str, float]:
    """One flat `{name: value}` from the shapes a report may hold:

    * `{"perplexity": {"ppl": 14.5, "protocol": "fixed_window_256", ...}}` -> `ppl.fixed_window_256`;
      the pipeline's flat `{"ppl": 14.5, "ppl_protocol": "fixed_window_256"}` -> the same key
    * `{"lm_eval": {task: {metric: v}}}`, `{task: {metric: v}}`, `{"task.metric": v}` -> `task/metric`
    * `{"efficiency": {...}}`, `eff.<name>` and plain numbers -> `<name>`.
    """
    out: dict[str, float] = {}
    m = m or {}
    for k, v in m.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            if k == "ppl" and isinstance(m.get("ppl_protocol"), str):
                out[f"ppl.{m['ppl_protocol']}"] = float(v)
            else:
                out[_canonical(k)] = float(v)
        elif isinstance(v, dict) and "ppl" in v and "protocol" in v:
            out[f"ppl.{v['protocol']}"] = float(v["ppl"])
        elif isinstance(v, dict) and k in ("lm_eval", "results"):
            out.update(flatten_metrics(v))
        elif isinstance(v, dict) and k in ("efficiency", "eff"):
            out.update({kk: float(vv) for kk, vv in v.items() if isinstance(vv, (int, float)) and not isinstance(vv, bool)})
        elif isinstance(v, dict):
            for kk, vv in v.items():
                if isinstance(vv, (int, float)) and not isinstance(vv, bool):
                    out[f"{k}/{kk}"] = float(vv)
    return out


def metrics_record(perplexity: dict | None = None, lm_eval_results: dict | None = None,
                   efficiency: dict | None = None) -> dict[str, Any]:
    """The `metrics_before` / `metrics_after` shape of report.json (see `report.py`)."""
    rec: dict[str, Any] = {}
    if perplexity is not None:
        rec["perplexity"] = dict(perplexity)
    if lm_eval_results is not None:
        rec["lm_eval"] = {t: dict(m) for t, m in (lm_eval_results.get("results", lm_eval_results)).items()}
        prot = lm_eval_results.get("protocols") if "results" in lm_eval_results else None
        if prot:
            rec["protocols"] = dict(prot)
    if efficiency is not None:
        rec["efficiency"] = dict(efficiency)
    return rec


def lower_is_better(name: str) -> bool:
    base = name.split("/")[-1]
    return any(p in base for p in LOWER_IS_BETTER) or name.startswith("ppl")


def retention(before: dict, after: dict) -> dict[str, float]:
    """Per metric after / before (before / after for perplexities, losses, latency and memory), so
    that 1.0 means "as good as dense" and above 1.0 "better"; plus `average` over the quality
    metrics (task accuracies and perplexities; efficiency figures are reported but not averaged).

    Both sides may be flat or nested (see `flatten_metrics`); only metrics present in both with a
    non-zero, finite denominator are compared.
    """
    b, a = flatten_metrics(before), flatten_metrics(after)
    out: dict[str, float] = {}
    for k in sorted(set(b) & set(a)):
        if k.split("/")[-1] in NOT_METRICS:
            continue
        x, y = b[k], a[k]
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        num, den = (x, y) if lower_is_better(k) else (y, x)
        if den == 0:
            continue
        out[k] = num / den
    quality = [v for k, v in out.items() if k not in EFFICIENCY_KEYS]
    if quality:
        out["average"] = sum(quality) / len(quality)
    return out
