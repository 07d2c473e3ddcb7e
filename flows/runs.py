"""Run folders under `$PRUNEFLOW_HOME/runs`: one per spec (`RunSpec.run_id`: the readable name plus a
short digest of the resolved spec, or `--name` as given), each with its report.json.

`resolve_run(runs, ref)` finds a run's report from what a user types:

* an id — the folder's name, or a prefix of it that only one run has;
* a name — the readable `<model>-<method>-<ratio>` (or `--name`) its report records: the latest run of
  that name (by the report's modification time).

A prefix several runs share is refused in one line that lists their ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from pruning_core.errors import ConfigError


def _runs(runs: Path) -> list[Path]:
    return sorted(d for d in runs.glob("*") if (d / "report.json").is_file()) if runs.is_dir() else []


def _name_of(report: Path) -> str | None:
    try:
        return json.loads(report.read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        return None


def find_run(runs: Path, ref: str, prefixes: bool = True) -> Path | None:
    """The report.json `ref` designates (see the module's docstring), or None; an id prefix several runs
    share is a ConfigError naming `run` that lists them. `prefixes=False`: exact ids and names only."""
    all_runs = _runs(runs)
    exact = [d for d in all_runs if d.name == ref]
    if exact:
        return exact[0] / "report.json"
    named = [d / "report.json" for d in all_runs if _name_of(d / "report.json") == ref]
    if named:
        return max(named, key=lambda p: p.stat().st_mtime_ns)
    prefixed = [d for d in all_runs if d.name.startswith(ref)] if prefixes and ref else []
    if len(prefixed) > 1:
        ids = ", ".join(d.name for d in prefixed[:20]) + (f" (+{len(prefixed) - 20} more)" if len(prefixed) > 20 else "")
        raise ConfigError("run", ref, f"one run; it is the prefix of several ids: {ids}")
    return prefixed[0] / "report.json" if prefixed else None


def resolve_run(runs: Path, ref: str) -> Path:
    """`find_run`, or a ConfigError naming `run` that lists some of the known ids."""
    found = find_run(runs, ref)
    if found is None:
        known = ", ".join(d.name for d in _runs(runs)[:10]) or "none yet"
        raise ConfigError("run", ref, f"a run id or name ({known}) or a report.json path")
    return found
