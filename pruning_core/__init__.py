"""pruning_core: the maths of pruneflow. torch + transformers (+ peft); no Prefect, MLflow or S3.

One function per pipeline step:
    load_model -> calibration_set -> capture_stats -> score -> select (or prune, coupled methods)
    -> apply_plan -> save_pruned / load_pruned -> perplexity (and evaluate / recover modules)
"""

from __future__ import annotations

from .adapters import adapter_for, supported_architectures
from .capture import capture_stats
from .checkpoint import is_uniform, load_pruned, save_pruned
from .data import calibration_set, eval_tokens, load_text, tokenize_text
from .engine import run_pass
from .errors import ConfigError, DataError, PruneflowError, StorageError
from .loading import resolve_dtype
from .methods import get_method, list_methods
from .metrics import flops_per_token, layer_table, perplexity, plan_params
from .models import load_model, model_revision, resolve_device, tiny_model
from .plan import LayerPlan, PrunePlan
from .select import layer_ratios, plan_from_scores
from .surgery import apply_plan, count_params

__version__ = "0.1.0"


def score(model, method_name: str, stats: dict, settings: dict | None = None) -> dict:
    """Importance scores of a score-then-select method (depend on model + stats + settings only)."""
    m = get_method(method_name)
    return m.score(model, adapter_for(model), stats, m.parse_settings(settings))


def select(model, method_name: str, scores: dict, ratio: float, settings: dict | None = None) -> PrunePlan:
    m = get_method(method_name)
    return m.select(model, adapter_for(model), scores, ratio, m.parse_settings(settings))


def prune(model, method_name: str, calib_ids, ratio: float, settings: dict | None = None,
          device="cpu", stats: dict | None = None) -> PrunePlan:
    """Prune `model` in place with any method and return the plan (surgery applied)."""
    from .select import check_ratio

    check_ratio(ratio)
    m = get_method(method_name)
    st = m.parse_settings(settings)
    adapter = adapter_for(model)
    if m.coupled:
        plan = m.prune(model, adapter, calib_ids, ratio, st, device=device)
    else:
        if stats is None:
            span = m.cosine_span(model, adapter, [ratio], st) if m.cosine_span is not None else None
            stats = capture_stats(model, adapter, calib_ids, requests=m.needs & {"attn_gram", "mlp_gram", "cosine"},
                                  device=device, cosine_span=span)
        plan = m.select(model, adapter, m.score(model, adapter, stats, st), ratio, st)
    apply_plan(model, plan)
    return plan


__all__ = [
    "ConfigError", "DataError", "LayerPlan", "PrunePlan", "PruneflowError", "StorageError",
    "adapter_for", "apply_plan", "calibration_set", "capture_stats", "count_params", "eval_tokens",
    "flops_per_token", "get_method", "is_uniform", "layer_ratios", "layer_table", "list_methods", "load_model",
    "load_pruned", "load_text", "model_revision", "perplexity", "plan_from_scores", "plan_params", "prune",
    "resolve_device", "resolve_dtype", "run_pass", "save_pruned", "score", "select", "supported_architectures",
    "tiny_model", "tokenize_text",
]
