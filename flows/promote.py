"""Gated promotion of pruned models in the MLflow registry, and rollback.

    every candidate          -> alias ``challenger``
    gate (configurable)      -> version tags ``pruneflow.gate.passed`` / ``pruneflow.gate.checks`` / ...
    gate passed + beats the champion -> alias ``champion`` moves to it (``pruneflow.previous_champion``
                                        on the new champion records where it came from)
    gate failed              -> ``champion`` never moves
    rollback                 -> ``champion`` moves back to the previous champion (or a given version);
                                the versions it moves away from are tagged ``pruneflow.retired``

The figures a gate reads are the version tags written by ``tasks.tracking`` from the run report
(``pruneflow.ppl_ratio``, ``pruneflow.acc_retention``, ``pruneflow.param_reduction``, ...), falling back
to the source run's ``gate.*`` metrics.

Invariant, which is what makes concurrent promotions safe without a lock: the champion is the best
(by ``rank_by``) non-retired version whose gate passed. Each promotion writes its gate tags first, then
elects that best version and sets the alias, then re-reads and re-elects until alias and election agree.
Whichever promotion writes last has seen every gate tag written before its final check, so two
promotions racing end with the alias on the better model.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger

from pruning_core.errors import ConfigError
from pruning_core.util import finite_float
from tasks.tracking import GATE_FIGURES, TAG, resolve_tracking_uri

CHAMPION, CHALLENGER = "champion", "challenger"
T_PASSED, T_CHECKS, T_GATE, T_AT = f"{TAG}gate.passed", f"{TAG}gate.checks", f"{TAG}gate.settings", f"{TAG}gate.at"
T_PREV, T_RETIRED, T_DECISION = f"{TAG}previous_champion", f"{TAG}retired", f"{TAG}promotion"


@dataclass
class Gate:
    """Thresholds a candidate must meet; ``None`` switches a check off.

    ppl ratio = perplexity after / dense perplexity; accuracy retention = mean over lm-eval ``acc``
    metrics of after / before; parameter reduction = removed fraction of parameters. A figure that a
    switched-on check needs but the version lacks fails the gate (never promote on missing evidence).
    ``rank_by`` (a figure name) decides which of two passing models is better.
    """

    max_ppl_ratio: float | None = 2.0
    min_acc_retention: float | None = 0.9
    min_param_reduction: float | None = 0.05
    rank_by: str = "ppl_ratio"
    higher_is_better: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Gate:
        d = dict(d or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"gate.{unknown[0]}", d[unknown[0]], ", ".join(sorted(names)))
        g = cls(**d)
        if g.rank_by not in GATE_FIGURES:
            raise ConfigError("gate.rank_by", g.rank_by, ", ".join(GATE_FIGURES))
        for name in ("max_ppl_ratio", "min_acc_retention", "min_param_reduction"):
            v = getattr(g, name)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
                raise ConfigError(f"gate.{name}", v, "a finite number or null (check off)")
        return g

    def check(self, figures: Mapping[str, float]) -> tuple[bool, dict[str, dict]]:
        """(passed, {check: {"value", "limit", "ok"}}) for a version's figures."""
        checks: dict[str, dict] = {}
        for name, fig, sign in (("max_ppl_ratio", "ppl_ratio", -1), ("min_acc_retention", "acc_retention", 1),
                                ("min_param_reduction", "param_reduction", 1)):
            limit = getattr(self, name)
            if limit is None:
                continue
            v = figures.get(fig)
            ok = v is not None and (v <= limit if sign < 0 else v >= limit)
            checks[fig] = {"value": v, "limit": limit, "rule": "<=" if sign < 0 else ">=", "ok": bool(ok)}
        return all(c["ok"] for c in checks.values()), checks

    def key(self, figures: Mapping[str, float], version: int) -> tuple:
        """Sort key, best first: rank figure, then larger parameter reduction, then the older version."""
        v = figures.get(self.rank_by)
        v = math.inf if v is None else (-v if self.higher_is_better else v)
        return (v, -(figures.get("param_reduction") or 0.0), version)


class _Client(MlflowClient):
    """Registry writes retried: two promotions setting the same alias at once make the SQL store's
    select-then-insert collide (IntegrityError) or SQLite report 'database is locked'."""

    def _retry(self, fn, *args):
        for attempt in range(8):
            try:
                return fn(*args)
            except MlflowException as e:
                transient = any(s in str(e) for s in ("UNIQUE constraint", "IntegrityError", "database is locked",
                                                      "Duplicate entry", "duplicate key"))
                if not transient or attempt == 7:
                    raise
                time.sleep(0.02 * (attempt + 1))

    def set_registered_model_alias(self, name, alias, version):
        return self._retry(super().set_registered_model_alias, name, alias, version)

    def set_model_version_tag(self, name, version=None, key=None, value=None, stage=None):
        return self._retry(super().set_model_version_tag, name, version, key, value)


def _client(uri: str | None) -> MlflowClient:
    uri = resolve_tracking_uri(uri)
    return _Client(tracking_uri=uri, registry_uri=uri)


def figures_of(client: MlflowClient, mv) -> dict[str, float]:
    """Gate figures of a model version: its ``pruneflow.*`` tags, else its source run's ``gate.*`` metrics."""
    figs = {k: finite_float(mv.tags.get(f"{TAG}{k}")) for k in GATE_FIGURES}
    figs = {k: v for k, v in figs.items() if v is not None}
    if len(figs) < len(GATE_FIGURES) and mv.run_id:
        try:
            metrics = client.get_run(mv.run_id).data.metrics
        except MlflowException:
            metrics = {}
        for k in GATE_FIGURES:
            if k not in figs and finite_float(metrics.get(f"gate.{k}")) is not None:
                figs[k] = finite_float(metrics[f"gate.{k}"])
    return figs


def _alias(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _versions(client: MlflowClient, name: str) -> list:
    return list(client.search_model_versions(f"name='{name}'"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def elect(client: MlflowClient, name: str, gate: Gate) -> str | None:
    """The best non-retired version whose gate passed (None when there is none)."""
    contenders = [mv for mv in _versions(client, name)
                  if mv.tags.get(T_PASSED) == "true" and not mv.tags.get(T_RETIRED)]
    if not contenders:
        return None
    best = min(contenders, key=lambda mv: gate.key(figures_of(client, mv), int(mv.version)))
    return str(best.version)


def _set_champion(client: MlflowClient, name: str, version: str, previous: str | None) -> None:
    if previous and previous != version:
        client.set_model_version_tag(name, version, T_PREV, previous)
    client.set_registered_model_alias(name, CHAMPION, version)


def resolve_version(client: MlflowClient, name: str, version: str | int | None) -> str:
    versions = _versions(client, name)
    if not versions:
        raise ConfigError("model", name, "a registered model name with at least one version "
                          f"(registered: {', '.join(sorted(m.name for m in client.search_registered_models()))})")
    if version is None:
        return str(max(int(mv.version) for mv in versions))
    if str(version) not in {str(mv.version) for mv in versions}:
        raise ConfigError("version", version, ", ".join(sorted((str(mv.version) for mv in versions), key=int)))
    return str(version)


def promote_version(name: str, version: str | int | None = None, gate: Gate | Mapping | None = None,
                    tracking_uri: str | None = None, settle_s: float = 0.05, max_rounds: int = 20) -> dict:
    """Challenger, gate, and (if passed and better) champion for ``name`` version ``version`` (default: latest)."""
    gate = gate if isinstance(gate, Gate) else Gate.from_dict(gate)
    client = _client(tracking_uri)
    version = resolve_version(client, name, version)
    client.set_registered_model_alias(name, CHALLENGER, version)
    mv = client.get_model_version(name, version)
    figs = figures_of(client, mv)
    passed, checks = gate.check(figs)
    before = _alias(client, name, CHAMPION)
    for k, v in {T_CHECKS: json.dumps(checks), T_GATE: json.dumps(asdict(gate)), T_AT: _now(),
                 T_PASSED: "true" if passed else "false"}.items():  # passed last: it makes it a contender
        client.set_model_version_tag(name, version, k, v)
    result = {"model": name, "version": version, "passed": passed, "checks": checks, "figures": figs,
              "champion_before": before}
    if not passed:
        client.set_model_version_tag(name, version, T_DECISION, "gate failed")
        result.update(champion=_alias(client, name, CHAMPION), promoted=False,
                      reason="gate failed: " + ", ".join(
                          f"{k} {'missing' if c['value'] is None else format(c['value'], '.4g')} not {c['rule']} "
                          f"{c['limit']}" for k, c in checks.items() if not c["ok"]))
        return result
    # elect until the alias and the election agree (concurrent promotions converge on the best)
    for _ in range(max_rounds):
        best, cur = elect(client, name, gate), _alias(client, name, CHAMPION)
        if best is not None and best != cur:
            _set_champion(client, name, best, cur)
        time.sleep(settle_s)
        if elect(client, name, gate) == _alias(client, name, CHAMPION):
            break
    champion = _alias(client, name, CHAMPION)
    promoted = champion == version
    client.set_model_version_tag(name, version, T_DECISION,
                                 "champion" if promoted else f"passed, champion v{champion} is better")
    result.update(champion=champion, promoted=promoted,
                  reason="passed the gate and beats the champion" if promoted
                  else f"passed the gate but champion version {champion} is better")
    return result


def rollback(name: str, to_version: str | int | None = None, tracking_uri: str | None = None,
             gate: Gate | Mapping | None = None) -> dict:
    """Move ``champion`` back: to ``to_version`` or to the champion's recorded previous champion.

    The version moved away from (and any contender ranked above the target) is tagged
    ``pruneflow.retired``, so later promotions do not re-elect it; rolling back *to* a retired version
    un-retires it.
    """
    gate = gate if isinstance(gate, Gate) else Gate.from_dict(gate)
    client = _client(tracking_uri)
    cur = _alias(client, name, CHAMPION)
    if to_version is None:
        if cur is None:
            raise ConfigError("model", name, "a model with a champion alias to roll back")
        to_version = client.get_model_version(name, cur).tags.get(T_PREV)
        if not to_version:
            raise ConfigError("to_version", None, f"a version number: champion v{cur} records no previous champion")
    target = resolve_version(client, name, to_version)
    why = f"rolled back from v{cur} to v{target} at {_now()}"
    tmv = client.get_model_version(name, target)
    if tmv.tags.get(T_RETIRED):
        client.delete_model_version_tag(name, target, T_RETIRED)
    tkey = gate.key(figures_of(client, tmv), int(target))
    retired = []
    for mv in _versions(client, name):
        v = str(mv.version)
        if v == target or mv.tags.get(T_RETIRED):
            continue
        if v == cur or (mv.tags.get(T_PASSED) == "true" and gate.key(figures_of(client, mv), int(v)) < tkey):
            client.set_model_version_tag(name, v, T_RETIRED, why)
            retired.append(v)
    client.set_registered_model_alias(name, CHAMPION, target)
    client.set_model_version_tag(name, target, T_DECISION, f"champion ({why})")
    return {"model": name, "champion": target, "champion_before": cur, "retired": retired}


def _from_run_dir(run_dir: str | Path) -> tuple[str, str, str | None]:
    f = Path(run_dir) / "tracking.json"
    if not f.exists():
        raise ConfigError("run", str(run_dir), "a run folder with tracking.json (written by a tracked run)")
    t = json.loads(f.read_text())
    if not t.get("model_name"):
        raise ConfigError("run", str(run_dir), f"a run whose model was registered (tracking: {t.get('status')})")
    return t["model_name"], str(t["model_version"]), t.get("uri")


def resolve_candidate(model: str, version: str | None, tracking_uri: str | None) -> tuple[str, str | None, str | None]:
    """``model`` is a registered model name, a run folder, or a run name under ``$PRUNEFLOW_HOME/runs``."""
    from tasks.tracking import pruneflow_home

    from .runs import find_run

    run = find_run(pruneflow_home() / "runs", model, prefixes=False)  # a run id, or a run name's latest run
    for d in (Path(model).expanduser(), pruneflow_home() / "runs" / model, *([run.parent] if run else [])):
        if d.is_dir() and (d / "tracking.json").exists():
            name, v, uri = _from_run_dir(d)
            return name, version or v, tracking_uri or uri
    return model, version, tracking_uri


def promote_candidate(model: str, version: str | None = None, gate: Gate | Mapping | None = None,
                      tracking_uri: str | None = None) -> dict:
    """The promote flow's body as a plain function (the command line's default: no Prefect server needed)."""
    model, version, tracking_uri = resolve_candidate(model, version, tracking_uri)
    return promote_version(model, version, gate, tracking_uri)


@flow(name="promote", log_prints=False)
def promote_flow(model: str, version: str | None = None, gate: dict | None = None,
                 tracking_uri: str | None = None) -> dict:
    """Prefect flow: ``model`` is a registered model name or a run folder (its ``tracking.json``)."""
    try:
        logger = get_run_logger()
    except Exception:  # called as promote_flow.fn(...) outside a flow run
        logger = logging.getLogger("pruneflow.promote")
    res = promote_candidate(model, version, gate, tracking_uri)
    logger.info("%s v%s: gate %s; champion v%s (%s)", res["model"], res["version"],
                "passed" if res["passed"] else "FAILED", res["champion"], res["reason"])
    return res
