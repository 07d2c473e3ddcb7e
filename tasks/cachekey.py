"""What a step's cache key is made of, and why a key missed.

A step's key covers (see `tasks.common.StepDef`): its settings, the digests of its input artifacts, the
model revision, its **code** and the **libraries** that change its results.

* Code: the source of the step's task function, of the helper functions in the same module it calls,
  and of every project module (`pruning_core`, `tasks`, `flows`) reachable from those through imports —
  module-level and function-level, found by walking the AST, not listed by hand. A package's
  ``__init__`` is followed only where code names the package itself (``from pruning_core import x``
  where ``x`` is not a submodule); the method registry loads its modules by name, so a step sees
  only the method module it is given. Editing ``pruning_core/obs.py`` therefore changes the prune key
  of SlimGPT and FLAP (both import it) and leaves Wanda's alone.
* Libraries: the installed versions of torch, transformers, tokenizers, safetensors, accelerate and
  numpy for every step, plus what a step adds (gguf for load, peft for recover, lm-eval and datasets
  for evaluate).

`KeyParts` keeps each part's own digest, so a miss can say which part is new compared with the
closest earlier record of the same step in the store (`explain_miss`).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata as md
import importlib.util
import inspect
import textwrap
import threading
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

PROJECT = ("pruning_core", "tasks", "flows")
BASE_LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "numpy")

# bump by hand only when a step's *meaning* changes in a way no source or library version shows
STEP_EPOCH = "2"


def _h(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


# -- modules ---------------------------------------------------------------------------------------
def _is_project(name: str) -> bool:
    return name.split(".", 1)[0] in PROJECT


@functools.cache
def _origin(modname: str) -> str | None:
    try:
        spec = importlib.util.find_spec(modname)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _is_package(modname: str) -> bool:
    o = _origin(modname)
    return bool(o and o.endswith("__init__.py"))


def _resolve(base: str | None, level: int, current: str) -> str:
    """The absolute module named by a (possibly relative) `from base import ...` in `current`."""
    if not level:
        return base or ""
    pkg = current if _is_package(current) else current.rpartition(".")[0]
    parts = pkg.split(".")
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([base] if base else []))


def _imports(tree: ast.AST, current: str) -> set[str]:
    """Project modules imported anywhere in `tree` (function bodies included)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node.module, node.level, current)
            for a in node.names:
                sub = f"{base}.{a.name}"
                # `from pkg import submodule` depends on the submodule; `from pkg import name` on pkg
                out.add(sub if _origin(sub) else base)
    return {m for m in out if m and _is_project(m) and _origin(m)}


@functools.cache
def _module(modname: str) -> tuple[str, frozenset[str]]:
    """(source digest, project modules it imports) of one module."""
    path = _origin(modname)
    src = open(path, "rb").read() if path else b""
    deps = _imports(ast.parse(src), modname) if src else set()
    return _h(src), frozenset(deps - {modname})


def module_closure(roots: Iterable[str]) -> dict[str, str]:
    """{module: source digest} for `roots` and every project module reachable from them."""
    seen: dict[str, str] = {}
    todo = [r for r in roots if _is_project(r)]
    while todo:
        m = todo.pop()
        if m in seen or not _origin(m):
            continue
        digest, deps = _module(m)
        seen[m] = digest
        todo.extend(d for d in deps if d not in seen)
    return seen


# -- functions -------------------------------------------------------------------------------------
def _function_parts(fn: types.FunctionType) -> tuple[dict[str, str], set[str]]:
    """({'module:function': digest} of `fn` and the same-module helpers it calls, project modules used)."""
    sources: dict[str, str] = {}
    modules: set[str] = set()
    todo = [fn]
    while todo:
        f = inspect.unwrap(todo.pop())
        label = f"{f.__module__}:{f.__qualname__}"
        if label in sources:
            continue
        try:
            src = textwrap.dedent(inspect.getsource(f))
        except (OSError, TypeError):
            sources[label] = _h(repr(f))
            continue
        sources[label] = _h(src)
        tree = ast.parse(src)
        modules |= _imports(tree, f.__module__)
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        g = getattr(f, "__globals__", {})
        for name in names:
            obj = g.get(name)
            if isinstance(obj, types.ModuleType):
                if _is_project(obj.__name__):
                    modules.add(obj.__name__)
                continue
            owner = getattr(obj, "__module__", None)
            if not owner or not _is_project(owner):
                continue
            if owner == f.__module__ and isinstance(obj, types.FunctionType):
                todo.append(obj)  # a helper beside the step: its source, not the whole module
            elif owner != f.__module__:
                modules.add(owner)
            elif hasattr(obj, "fn") and isinstance(obj.fn, types.FunctionType):  # a Prefect task object
                todo.append(obj.fn)
    return sources, modules


# CPython 3.11's AST constructor is not safe in concurrent threads ("AST constructor recursion depth
# mismatch"): steps submitted to a thread pool or a threaded Dask worker compute their keys in parallel
_AST_LOCK = threading.RLock()


def code_parts(*roots: Any) -> dict[str, str]:
    """Per-part digests of everything the given functions / modules (objects or dotted names) run."""
    with _AST_LOCK:
        return _code_parts(roots)


def _code_parts(roots: tuple) -> dict[str, str]:
    parts: dict[str, str] = {"epoch": STEP_EPOCH}
    modules: set[str] = set()
    for r in roots:
        if isinstance(r, str):
            modules.add(r)
        elif isinstance(r, types.ModuleType):
            modules.add(r.__name__)
        else:
            fn = getattr(r, "fn", r)  # Prefect tasks wrap the function
            srcs, mods = _function_parts(fn)
            parts.update(srcs)
            modules |= mods
    parts.update(module_closure(modules))
    return dict(sorted(parts.items()))


# -- libraries -------------------------------------------------------------------------------------
def _dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def library_versions(extra: Iterable[str] = ()) -> dict[str, str | None]:
    return {n: _dist_version(n) for n in sorted({*BASE_LIBRARIES, *extra})}


# -- keys and misses -------------------------------------------------------------------------------
@dataclass
class KeyParts:
    """Everything a step key is made of, each part kept apart so that a miss can be explained."""

    step: str
    settings: dict
    inputs: list[str | None]
    model_revision: str | None
    code: dict[str, str] = field(default_factory=dict)
    libraries: dict[str, str | None] = field(default_factory=dict)
    # not in the key: which kind of run of the step this is (the dense or a pruned evaluation), so that a
    # miss is explained against earlier runs of the same kind only
    lineage: str | None = None

    def key(self) -> str:
        payload = {"step": self.step, "settings": self.settings, "inputs": self.inputs,
                   "model_revision": self.model_revision, "code": self.code, "libraries": self.libraries}
        return _h_json(payload, 32)

    def summary(self) -> dict:
        """What the store keeps beside the record (digests only, small)."""
        return {"settings": self.settings, "settings_digest": _h_json(self.settings),
                "inputs": self.inputs, "model_revision": self.model_revision,
                "code": self.code, "libraries": self.libraries, "lineage": self.lineage}


def _h_json(obj: Any, n: int = 16) -> str:
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _diff_dict(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k)]


def differences(old: dict, new: KeyParts) -> dict[str, list[str]]:
    """Which parts of `new` differ from an earlier record's `old` summary: {part: [what changed]}."""
    out: dict[str, list[str]] = {}
    if old.get("settings") != new.settings:
        o, n = _flat(old.get("settings") or {}), _flat(new.settings)
        out["settings"] = [f"{k}: {_short(o.get(k))} -> {_short(n.get(k))}" for k in _diff_dict(o, n)]
    if old.get("inputs") != new.inputs:
        out["input artifact"] = [f"#{i}: {_short(a)} -> {_short(b)}" for i, (a, b) in
                                 enumerate(_zip_long(old.get("inputs") or [], new.inputs)) if a != b]
    if old.get("model_revision") != new.model_revision:
        out["model revision"] = [f"{_short(old.get('model_revision'))} -> {_short(new.model_revision)}"]
    if old.get("code") != new.code:
        out["code"] = [_code_label(k) for k in _diff_dict(old.get("code") or {}, new.code)]
    if old.get("libraries") != new.libraries:
        o = old.get("libraries") or {}
        out["library version"] = [f"{k} {o.get(k)} -> {new.libraries.get(k)}" for k in _diff_dict(o, new.libraries)]
    return out


def explain_miss(previous: list[dict], new: KeyParts) -> dict:
    """The reason of a miss against the closest earlier record, or a first run. Closest: same input
    artifacts first (the same lineage: dense and pruned evaluations share one step), then the fewest
    differing parts."""
    best, rank = None, None
    if new.lineage is not None:  # the dense evaluation of a first run is not "the pruned one with a new input"
        previous = [r for r in previous if r.get("lineage", new.lineage) == new.lineage]
    for rec in previous:
        d = differences(rec, new)
        r = ("input artifact" in d, len(d), sum(map(len, d.values())))
        if rank is None or r < rank:
            best, rank = d, r
    if best is None:
        return {"reason": "first run of this step in this store", "changed": {}}
    if not best:  # same parts, but the record's artifact was missing or corrupt
        return {"reason": "the cached artifact was missing or corrupt", "changed": {}}
    return {"reason": "new " + ", ".join(best), "changed": best}


def format_reason(why: dict, limit: int = 3) -> str:
    parts = []
    for part, items in why.get("changed", {}).items():
        shown = ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
        parts.append(f"{part}: {shown}" if shown else part)
    return "; ".join(parts) or why.get("reason", "")


def _code_label(k: str) -> str:
    if ":" in k:
        return k  # a function
    o = _origin(k)
    if not o:
        return k
    return k.replace(".", "/") + ("/__init__.py" if o.endswith("__init__.py") else ".py")


def _flat(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix or "value": d}
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def _short(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 24 else s[:12] + "…"


def _zip_long(a: list, b: list):
    n = max(len(a), len(b))
    return [(a[i] if i < len(a) else None, b[i] if i < len(b) else None) for i in range(n)]
