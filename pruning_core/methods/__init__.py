"""Pruning methods, one module each, behind a registry keyed by name."""

from __future__ import annotations

import importlib

from .base import REGISTRY, Method, MethodSettings, Scores, get_method, list_methods, register

# every method module registers itself on import; a module that is not there yet is skipped
_MODULES = ("baselines", "llm_rank", "streamline", "slimgpt", "flap")
_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for m in _MODULES:
        try:
            importlib.import_module(f"{__name__}.{m}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{m}":
                raise


__all__ = ["REGISTRY", "Method", "MethodSettings", "Scores", "get_method", "list_methods", "register"]
