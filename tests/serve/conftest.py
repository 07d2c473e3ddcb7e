"""Tests marked `serve` load exported checkpoints in a real vLLM (the separate .venv-serve env).

They run only when selected: `pytest -m serve tests/serve` (`make serve-test`). In the default suite they
are skipped with that hint, so the main suite never waits for vLLM.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    if "serve" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="vLLM test: run `make serve-test` (pytest -m serve tests/serve)")
    for item in items:
        if "serve" in item.keywords:
            item.add_marker(skip)
