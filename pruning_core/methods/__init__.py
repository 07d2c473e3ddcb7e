"""Pruning methods, one module each, behind a registry keyed by name (see `base`)."""

from __future__ import annotations

from .base import REGISTRY, Method, MethodSettings, Scores, _load_all, get_method, list_methods, register

__all__ = ["REGISTRY", "Method", "MethodSettings", "Scores", "_load_all", "get_method", "list_methods", "register"]
