"""MLflow tracking of a compression run: parent run + one child per step, plots, model + registry.

Called once at the end of the compress flow, after the checkpoint and ``report.json`` are written:

    track_compress_run(spec, report, run_dir) -> {"status": "ok" | "failed: ...", "run_id", "model_name",
                                                 "model_version", "uri", "experiment_id", "child_runs"}

- **Where**: ``spec["tracking"]["uri"]`` > ``MLFLOW_TRACKING_URI`` > ``sqlite:///$PRUNEFLOW_HOME/mlflow.db``
  (experiment created with artifacts under ``$PRUNEFLOW_HOME/mlartifacts``). Any remote server works the same.
- **Parent run**: params = the flattened spec; metrics = report figures with sanitised names
  (``acc,none`` -> ``acc``), the recovery loss / validation curves and per-layer ratios as metric histories;
  artifacts ``report.json``, ``report.md``, ``plan.json``, the lm-eval JSON and the plots the flow drew
  (``<run_dir>/plots``, the ones report.md shows); only MLflow's public API; tags
  = Prefect flow-run id, code revision, ``pruneflow.cache.<step>`` = hit|miss.
- **Child run per step**: its settings, ``seconds``, tags ``pruneflow.cache`` and ``pruneflow.cache_key``.
  A cached step's child carries ``pruneflow.producer_run_id``: the child run that computed it (the index
  is an MLflow search on the ``pruneflow.cache_key`` tag, or the report's ``producer_run``).
- **Model**: the pruned checkpoint is logged as an MLflow model and registered under
  ``<base model>-<method>``. Uniform checkpoints use the transformers flavour (loadable with
  ``mlflow.transformers.load_model`` and ``mlflow.pyfunc.load_model``); non-uniform ones (per-layer sizes
  in the config) a pyfunc :class:`PrunedCheckpointModel` that rebuilds them with
  ``pruning_core.checkpoint.load_pruned``. Both generate text from ``predict(["prompt", ...])``.
  Gate figures (``ppl_ratio``, ``acc_retention``, ``param_reduction``...) are set as version tags
  ``pruneflow.<name>``, read by ``flows.promote``. A checkpoint whose content digest (the sha256 in its
  store URI) is already registered is not logged again: the run points at that version.
- **Sweeps**: :func:`track_sweep` logs one run with the points and the PPL / accuracy-versus-ratio plot.
- **Unreachable server**: ``tracking.on_failure: warn`` (default) logs a warning and returns
  ``status: "failed: ..."`` (the checkpoint and report are already on disk); ``fail`` raises
  :class:`~pruning_core.errors.StorageError`. The outcome is also written to ``<run_dir>/tracking.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from pruning_core.errors import ConfigError, StorageError
from pruning_core.util import finite_float as _num
from pruning_core.util import git_revision
from pruning_core.util import home as pruneflow_home

log = logging.getLogger("pruneflow.tracking")

DEFAULT_EXPERIMENT = "pruneflow"
TAG = "pruneflow."  # prefix of every tag this module writes
GATE_FIGURES = ("ppl_before", "ppl_after", "ppl_ratio", "acc_retention", "param_reduction", "params_after",
                "params_before")
_METRIC_OK = re.compile(r"[^A-Za-z0-9_\-./ ]")
_REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------- settings
@dataclass
class TrackingSettings:
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else the SQLite file under PRUNEFLOW_HOME
    experiment: str = DEFAULT_EXPERIMENT
    on_failure: str = "warn"  # warn | fail
    enabled: bool = True
    log_model: bool = True
    registered_model: str | None = None  # None: "<base model>-<method>"
    plots: bool = True
    probe_timeout_s: float = 5.0  # reachability probe of an http(s) server before anything is logged
    max_new_tokens: int = 32  # default generation length of the logged model

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | None) -> TrackingSettings:
        """Tolerant reader of ``spec["tracking"]`` (a dict, a URI string, False/None)."""
        t = (spec or {}).get("tracking")
        if hasattr(t, "model_dump"):
            t = t.model_dump()
        if t is False:
            return cls(enabled=False)
        if isinstance(t, str):
            t = {"uri": t}
        t = dict(t or {})
        known = {k: t[k] for k in cls.__dataclass_fields__ if k in t and t[k] is not None}
        s = cls(**known)
        if s.on_failure not in ("warn", "fail"):
            raise ConfigError("tracking.on_failure", s.on_failure, "warn or fail")
        return s


def resolve_tracking_uri(uri: str | None = None) -> str:
    """Spec value, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///$PRUNEFLOW_HOME/mlflow.db``."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = pruneflow_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(home / 'mlflow.db').resolve()}"


def _default_artifact_location(uri: str) -> str | None:
    """Local SQLite stores keep their artifacts in a sibling ``mlartifacts`` folder; servers decide themselves."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return (db.parent / "mlartifacts").resolve().as_uri()


def client_for(uri: str) -> MlflowClient:
    """A client whose stores exist: on a fresh SQLite file the first client creates (migrates) the schema,
    which two runs starting together must not do at once."""
    with _sqlite_init_lock(uri):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_registered_models(max_results=1)  # the registry's store migrates on first use
        return client


def ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    with _sqlite_init_lock(uri):
        return _ensure_experiment(client, name, uri)


@contextlib.contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[None]:
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    fd = os.open(uri[len("sqlite:///"):] + ".init-lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _ensure_experiment(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_default_artifact_location(uri))
    except mlflow.exceptions.MlflowException:  # created meanwhile by a concurrent run
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def probe(uri: str, timeout_s: float = 5.0) -> None:
    """Raise ``ConnectionError`` fast when an http(s) tracking server does not answer ``/health``."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:  # noqa: S310
            r.read(64)
    except Exception as e:  # URLError, timeout, refused, HTTP 5xx
        raise ConnectionError(f"MLflow tracking server {uri} unreachable: {e}") from e


@contextlib.contextmanager
def using_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (needed by ``log_model``) at ``uri`` for the block, then restore exactly
    what was there (``set_tracking_uri`` also writes the ``MLFLOW_TRACKING_URI`` env var)."""
    # set_tracking_uri / set_registry_uri mirror what they set into these variables, so the variables are
    # the whole previous state: restore them and clear the explicit URIs (restoring an URI that came from
    # the environment as an explicit one would outlive the variable: a later run then talks to a server
    # that is gone)
    prev_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        for k, v in prev_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------- naming
def sanitize_metric_name(name: str) -> str:
    """A valid MLflow metric/param name: ``acc,none`` -> ``acc``, ``acc,flex`` -> ``acc_flex``, rest -> ``_``."""
    name = re.sub(r",none\b", "", str(name))
    return _METRIC_OK.sub("_", name.replace(",", "_")).strip() or "_"


def registered_model_name(model: str, method: str) -> str:
    """``smollm2-135m`` + ``slimgpt`` -> ``smollm2-135m-slimgpt``; a path contributes its last part."""
    base = Path(str(model).rstrip("/")).name or str(model)
    name = f"{base}-{method}".lower()
    return re.sub(r"[^a-z0-9_.\-]+", "-", name).strip("-")


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": leaf}``; lists of scalars stay leaves (logged as their JSON)."""
    out: dict[str, Any] = {}
    if hasattr(d, "model_dump"):
        d = d.model_dump()
    if isinstance(d, Mapping):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        if not d and prefix:
            out[prefix[:-1]] = "{}"
        return out
    out[prefix[:-1] if prefix else "value"] = d
    return out


def spec_params(spec: Mapping[str, Any]) -> dict[str, str]:
    params = {}
    for k, v in flatten(spec).items():
        s = v if isinstance(v, str) else json.dumps(v, default=str)
        params[sanitize_metric_name(k)] = s[:6000]
    return params


def report_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """Every numeric figure of the report, with MLflow-safe names (``after.lm_eval.task.acc``...)."""
    m: dict[str, float] = {}
    for key in ("params_before", "params_after", "removed_fraction", "target_ratio", "removed_decoder_fraction",
                "decoder_params_before", "stability"):
        if _num(report.get(key)) is not None:
            m[key] = _num(report.get(key))
    for section, prefix in (("metrics_before", "before"), ("metrics_after", "after"), ("retention", "retention"),
                            ("metrics_before_recovery", "before_recovery")):
        for k, v in flatten(report.get(section) or {}).items():
            if _num(v) is not None:
                m[sanitize_metric_name(f"{prefix}.{k}")] = _num(v)
    for step, secs in (report.get("timings") or {}).items():
        if _num(secs) is not None:
            m[sanitize_metric_name(f"time.{step}")] = _num(secs)
    info = report.get("recovery_info") or {}
    for k in ("seconds", "tokens_seen", "tokens_per_s", "trainable_params", "teacher_bytes", "kept_mass"):
        if isinstance(info, Mapping) and _num(info.get(k)) is not None:
            m[f"recovery.{k}"] = _num(info.get(k))
    m.update({f"gate.{k}": v for k, v in gate_figures(report).items()})
    return m


def _find(flat: Mapping[str, Any], leaf: str) -> float | None:
    """The first numeric value whose key's last part (after sanitising) is ``leaf``; shortest key first."""
    for k in sorted(flat, key=lambda k: (k.count("."), k)):
        if sanitize_metric_name(k.split(".")[-1]) == leaf and _num(flat[k]) is not None:
            return _num(flat[k])
    return None


def gate_figures(report: Mapping[str, Any]) -> dict[str, float]:
    """What a promotion gate looks at: perplexity ratio to dense, accuracy retention, parameter reduction."""
    before = flatten(report.get("metrics_before") or {})
    after = flatten(report.get("metrics_after") or {})
    g: dict[str, float] = {}
    pb, pa = _find(before, "ppl"), _find(after, "ppl")
    if pb is not None:
        g["ppl_before"] = pb
    if pa is not None:
        g["ppl_after"] = pa
    if pb and pa is not None:
        g["ppl_ratio"] = pa / pb
    # accuracy retention: mean over lm-eval "acc" metrics of after / before
    ratios = []
    for k, v in after.items():
        leaf = sanitize_metric_name(k.split(".")[-1])
        if leaf == "acc" and _num(v) is not None and _num(before.get(k)):
            ratios.append(_num(v) / _num(before[k]))
    if not ratios:
        ratios = [_num(v) for k, v in flatten(report.get("retention") or {}).items()
                  if sanitize_metric_name(k.split(".")[-1]) == "acc" and _num(v) is not None]
    if ratios:
        g["acc_retention"] = sum(ratios) / len(ratios)
    p0, p1 = _num(report.get("params_before")), _num(report.get("params_after"))
    if p0 is not None:
        g["params_before"] = p0
    if p1 is not None:
        g["params_after"] = p1
    if _num(report.get("removed_fraction")) is not None:
        g["param_reduction"] = _num(report["removed_fraction"])
    elif p0 and p1 is not None:
        g["param_reduction"] = 1.0 - p1 / p0
    return g


# ------------------------------------------------------------------------------------ report readers
def _artifact_path(ref: Any) -> str | None:
    """A manifest ``{uri, ...}``, a ``file://`` URI or a plain path -> a local path or remote URI."""
    if isinstance(ref, Mapping):
        ref = ref.get("uri") or ref.get("path")
    if not ref or not isinstance(ref, str):
        return None
    return ref[len("file://"):] if ref.startswith("file://") else ref


def _local_copy(ref: str, tmp: Path) -> Path | None:
    if "://" not in ref:
        p = Path(ref).expanduser()
        return p if p.exists() else None
    try:  # s3:// and other fsspec stores
        import fsspec

        dst = tmp / Path(ref.rstrip("/")).name
        fs, path = fsspec.core.url_to_fs(ref)
        fs.get(path, str(dst), recursive=fs.isdir(path))
        return dst
    except Exception as e:  # a missing remote artifact must not sink the whole tracking
        log.warning("could not fetch %s for MLflow: %s", ref, e)
        return None


def _artifacts(report: Mapping[str, Any], run_dir: Path) -> dict[str, str]:
    arts = {k: _artifact_path(v) for k, v in (report.get("artifacts") or {}).items()}
    arts = {k: v for k, v in arts.items() if v}
    if arts.get("checkpoint_local"):  # the pipeline's local link to the store object
        arts["checkpoint"] = arts["checkpoint_local"]
    if "checkpoint" not in arts:
        for cand in (run_dir / "checkpoint", run_dir / "model", run_dir):
            if (cand / "config.json").exists():
                arts["checkpoint"] = str(cand)
                break
    if "plan" not in arts:
        for cand in (run_dir / "plan.json", Path(arts.get("checkpoint", run_dir)) / "plan.json"):
            if cand.exists():
                arts["plan"] = str(cand)
                break
    if not any("lm_eval" in k or "lmeval" in k for k in arts):
        found = sorted(run_dir.glob("*lm_eval*.json")) + sorted(run_dir.glob("*lmeval*.json"))
        if found:
            arts["lm_eval"] = str(found[0])
    return arts


def _steps(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Union of ``report["steps"]``, ``timings`` and ``cache`` into ``{step: {seconds, cache, ...}}``."""
    steps: dict[str, dict[str, Any]] = {k: dict(v or {}) for k, v in (report.get("steps") or {}).items()}
    for name, secs in (report.get("timings") or {}).items():
        steps.setdefault(name, {}).setdefault("seconds", secs)
    for name, c in (report.get("cache") or {}).items():
        if isinstance(c, Mapping):
            for k, v in c.items():
                steps.setdefault(name, {}).setdefault("cache_key" if k == "key" else k, v)
            continue
        if isinstance(c, bool):
            c = "hit" if c else "miss"
        steps.setdefault(name, {}).setdefault("cache", c)
    arts = report.get("artifacts") or {}
    for name, st in steps.items():  # a step's output URI is content-addressed: the same output, the same key
        uri = _artifact_path(arts.get(name))
        if uri and not (st.get("cache_key") or st.get("key")):
            st["cache_key"] = "artifact:" + hashlib.sha256(uri.encode()).hexdigest()[:24]
    return steps


def lm_eval_results(report: Mapping[str, Any]) -> dict:
    """lm-eval figures of the report (keys ``task.metric,filter``) regrouped as lm-eval's results JSON."""
    out: dict[str, dict] = {}
    for phase in ("before", "after"):
        res: dict[str, dict] = {}
        for k, v in flatten(report.get(f"metrics_{phase}") or {}).items():
            if "," in k and "." in k:
                task, metric = k.rsplit(".", 1)
                res.setdefault(task, {})[metric] = v
        if res:
            out[phase] = {"results": res}
    return out


def code_revision(report: Mapping[str, Any]) -> str:
    v = report.get("versions") or {}
    for k in ("code_revision", "git", "git_sha", "revision"):
        if isinstance(v, Mapping) and v.get(k):
            return str(v[k])
    return git_revision(_REPO) or "unknown"


def _flow_run_id(report: Mapping[str, Any]) -> str | None:
    for k in ("flow_run_id", "prefect_flow_run_id"):
        if report.get(k):
            return str(report[k])
    pf = report.get("prefect")
    if isinstance(pf, Mapping) and pf.get("flow_run_id"):
        return str(pf["flow_run_id"])
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:
        return None


def find_producer_run(client: MlflowClient, experiment_id: str, cache_key: str) -> str | None:
    """The child run that computed ``cache_key`` (cache miss), newest first: the cache index."""
    if not cache_key:
        return None
    key = str(cache_key).replace("'", "")
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG}cache_key` = '{key}' and tags.`{TAG}cache` = 'miss'",
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


# --------------------------------------------------------------------------------------------- model
def pip_requirements() -> list[str]:
    """Explicit requirements (MLflow's inference would add torchvision, which is not installed)."""
    import torch
    import transformers

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"transformers=={transformers.__version__}", "safetensors", "accelerate", "pydantic", "pyyaml"]


class PrunedCheckpointModel(mlflow.pyfunc.PythonModel):
    """pyfunc for pruned checkpoints with per-layer sizes: rebuilt by ``pruning_core.checkpoint.load_pruned``.

    ``predict(["prompt", ...])`` (or a DataFrame whose first column holds prompts) returns the prompt
    followed by a greedy continuation, like the transformers text-generation pipeline.
    ``params``/model_config: ``max_new_tokens`` (default 32).
    """

    def load_context(self, context):
        from pruning_core.checkpoint import load_pruned

        self.model, self.tokenizer = load_pruned(context.artifacts["checkpoint"], device="cpu")
        self.max_new_tokens = int((context.model_config or {}).get("max_new_tokens", 32))

    def predict(self, context, model_input, params=None):
        import torch

        if hasattr(model_input, "iloc"):  # pandas DataFrame
            prompts = [str(x) for x in model_input.iloc[:, 0].tolist()]
        elif isinstance(model_input, str):
            prompts = [model_input]
        elif isinstance(model_input, Mapping):
            v = next(iter(model_input.values()))
            prompts = [v] if isinstance(v, str) else [str(x) for x in v]
        else:
            prompts = [str(x) for x in model_input]
        n = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        tok, out = self.tokenizer, []
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        for p in prompts:
            enc = tok(p, return_tensors="pt")
            with torch.no_grad():
                ids = self.model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=pad)
            out.append(tok.decode(ids[0], skip_special_tokens=True))
        return out


@contextlib.contextmanager
def _pipeline_class_names() -> Iterator[None]:
    """MLflow 3's local-checkpoint path reads `check_task(task)[1]["impl"].__name__`; transformers 5 names
    the pipeline class by its dotted path instead (a string). For the block, the entry carries an object
    with that class name, which is all MLflow records (`instance_type`)."""
    from types import SimpleNamespace

    from transformers import pipelines

    real = pipelines.check_task

    def check_task(task):
        name, meta, options = real(task)
        if isinstance(meta.get("impl"), str):
            meta = {**meta, "impl": SimpleNamespace(__name__=meta["impl"].rsplit(".", 1)[-1])}
        return name, meta, options

    pipelines.check_task = check_task
    try:
        yield
    finally:
        pipelines.check_task = real


def log_checkpoint_model(checkpoint: str | Path, name: str | None, max_new_tokens: int = 32):
    """Log a checkpoint folder as an MLflow model in the active run (and register it when ``name``).

    The folder is logged as it is (its files copied), never loaded: a uniform checkpoint through the
    transformers flavour's local-checkpoint path, one with per-layer sizes as a pyfunc artifact. Logging
    a 70B checkpoint costs disk and time, not host memory."""
    from pruning_core.checkpoint import is_uniform

    ckpt = Path(checkpoint).resolve()  # the run folder's link -> the store object (MLflow refuses links out)
    reqs = pip_requirements()
    if is_uniform(ckpt):
        if not any((ckpt / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise StorageError("artifacts.checkpoint", str(ckpt), "a checkpoint folder with its tokenizer")
        with _pipeline_class_names():
            return mlflow.transformers.log_model(
                transformers_model=str(ckpt), task="text-generation", name="model",
                registered_model_name=name, pip_requirements=reqs,
                model_config={"max_new_tokens": max_new_tokens, "do_sample": False},
                metadata={"pruneflow_uniform": True})
    from mlflow.models import infer_signature

    code = [str(_REPO / "pruning_core"), str(_REPO / "tasks")]
    signature = infer_signature(["prompt"], ["prompt and continuation"], params={"max_new_tokens": max_new_tokens})
    return mlflow.pyfunc.log_model(
        name="model", python_model=PrunedCheckpointModel(), artifacts={"checkpoint": str(ckpt)}, signature=signature,
        code_paths=[c for c in code if Path(c).is_dir()], registered_model_name=name, pip_requirements=reqs,
        model_config={"max_new_tokens": max_new_tokens}, metadata={"pruneflow_uniform": False})


# ---------------------------------------------------------------------------------------------- plots
def _plots(run_dir: Path) -> list[Path]:
    """The run's plots, as the flow drew them for report.md (``<run_dir>/plots/*.png``): the recovery
    loss curve, kept structure per layer, per-layer ratios. Nothing is redrawn or guessed here."""
    return sorted((run_dir / "plots").glob("*.png"))


def curve_metrics(report: Mapping[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Series the report holds, as MLflow metric histories ``{name: [(step, value)]}``: the recovery
    training loss (LoRA or the Streamline replacement), its validation MSE, the per-layer ratios."""
    out: dict[str, list[tuple[int, float]]] = {}
    info = report.get("recovery_info") or {}
    if isinstance(info, Mapping):
        loss = [(i + 1, _num(v)) for i, v in enumerate(info.get("loss_curve") or [])]
        out["recovery.loss"] = [(i, v) for i, v in loss if v is not None]
        kl = [(i + 1, _num(v)) for i, v in enumerate(info.get("kl_curve") or [])]
        out["recovery.kl"] = [(i, v) for i, v in kl if v is not None]
        val = [(int(st), _num(v)) for st, v in (info.get("val_curve") or [])]
        out["recovery.val_mse"] = [(i, v) for i, v in val if v is not None]
    layers = report.get("layers") or []
    out["layer.removed_fraction"] = [(int(lp.get("index", i)), _num(lp.get("ratio"))) for i, lp in enumerate(layers)
                                     if _num(lp.get("ratio")) is not None]
    return {k: v for k, v in out.items() if v}


# ----------------------------------------------------------------------------------------- the entry
def track_compress_run(spec: Mapping[str, Any], report: Mapping[str, Any], run_dir: str | os.PathLike) -> dict:
    """Log one compression run to MLflow (see the module doc). Never loses the run's own outputs."""
    settings = TrackingSettings.from_spec(spec)
    run_dir = Path(run_dir)
    if not settings.enabled:
        return _record(run_dir, {"status": "disabled"})
    uri = resolve_tracking_uri(settings.uri)
    try:
        probe(uri, settings.probe_timeout_s)
        result = _track(settings, uri, spec, report, run_dir)
    except Exception as e:
        msg = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        _record(run_dir, {"status": msg, "uri": uri})
        if settings.on_failure == "fail":
            raise StorageError("tracking.uri", uri, "a reachable, writable MLflow tracking store "
                               "(or tracking.on_failure: warn)", str(e).splitlines()[0][:200] if str(e) else None
                               ) from e
        log.warning("MLflow tracking failed; checkpoint and report are kept in %s: %s", run_dir, msg)
        return {"status": msg, "uri": uri, "run_id": None, "model_version": None}
    return _record(run_dir, result)


def _record(run_dir: Path, result: dict) -> dict:
    try:
        if run_dir.is_dir():
            tmp = run_dir / ".tracking.json.tmp"
            tmp.write_text(json.dumps(result, indent=1, default=str))
            os.replace(tmp, run_dir / "tracking.json")
    except OSError as e:
        log.warning("could not write tracking.json: %s", e)
    return result


def _track(settings: TrackingSettings, uri: str, spec, report, run_dir: Path) -> dict:
    client = client_for(uri)
    exp_id = ensure_experiment(client, settings.experiment, uri)
    model, method = str(report.get("model", "model")), str(report.get("method", "method"))
    ratio = report.get("target_ratio")
    steps = _steps(report)
    arts = _artifacts(report, run_dir)
    tags = {f"{TAG}model": model, f"{TAG}method": method, f"{TAG}code_revision": code_revision(report),
            "mlflow.source.git.commit": code_revision(report), f"{TAG}run_dir": str(run_dir.resolve())}
    flow_run = _flow_run_id(report)
    if flow_run:
        tags[f"{TAG}prefect_flow_run_id"] = flow_run
    if isinstance(report.get("placement"), Mapping):  # the run's, chosen once: dense and pruned under it
        tags[f"{TAG}placement"] = str(report["placement"].get("placement"))
    for name, st in steps.items():
        if st.get("cache"):
            tags[f"{TAG}cache.{sanitize_metric_name(name)}"] = str(st["cache"])
    result: dict[str, Any] = {"status": "ok", "uri": uri, "experiment_id": exp_id, "child_runs": {}}
    run_name = f"{Path(model).name}-{method}" + (f"-r{ratio}" if ratio is not None else "")
    with using_uri(uri), tempfile.TemporaryDirectory(prefix="pruneflow-track-") as tmpd:
        tmp = Path(tmpd)
        nested = mlflow.active_run() is not None
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=tags, nested=nested) as parent:
            result["run_id"] = parent.info.run_id
            params = spec_params(spec)
            items = list(params.items())
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i:i + 100]))
            mlflow.log_metrics(report_metrics(report))
            mlflow.log_dict(dict(report), "report.json")
            for key, ref in arts.items():
                if key == "checkpoint" or not (key == "plan" or "lm_eval" in key or "lmeval" in key):
                    continue
                f = _local_copy(ref, tmp)
                if f and f.is_file():
                    dst = tmp / "named" / ("plan.json" if key == "plan" else f.name)
                    dst.parent.mkdir(exist_ok=True)
                    dst.write_bytes(f.read_bytes())
                    mlflow.log_artifact(str(dst))
            if not any("lm_eval" in k or "lmeval" in k for k in arts):
                lm = lm_eval_results(report)
                if lm:
                    mlflow.log_dict(lm, "lm_eval_results.json")
            run_id = parent.info.run_id
            for name, series in curve_metrics(report).items():
                for step, value in series:
                    client.log_metric(run_id, name, value, step=step)
            if settings.plots:
                for p in _plots(run_dir):
                    mlflow.log_artifact(str(p), artifact_path="plots")
            if (run_dir / "report.md").is_file():
                mlflow.log_artifact(str(run_dir / "report.md"))
            for name, st in steps.items():
                result["child_runs"][name] = _log_step(client, exp_id, name, st)
            ckpt = arts.get("checkpoint")
            if settings.log_model and ckpt:
                name = settings.registered_model or registered_model_name(model, method)
                key = checkpoint_key(report)
                # find-or-register under the store's lock: two runs that produced the same checkpoint at
                # once register it once (the second waits, then finds the first one's version)
                with _registration_lock(report, name, key):
                    known = _registered_version(client, name, key) if key else None
                    if known is not None:  # the same checkpoint bytes are registered already: point at them
                        result.update(model_name=name, model_uri=f"models:/{name}/{known.version}",
                                      model_version=str(known.version), model_reused=True)
                        mlflow.set_tags({f"{TAG}registered_model": f"{name}/{known.version}",
                                         f"{TAG}model_producer_run_id": str(known.tags.get(f"{TAG}run_id", ""))})
                    else:
                        ckpt_local = _local_copy(ckpt, tmp)
                        if ckpt_local is None or not (ckpt_local / "config.json").exists():
                            raise StorageError("artifacts.checkpoint", ckpt, "a checkpoint folder with config.json")
                        info = log_checkpoint_model(ckpt_local, name, settings.max_new_tokens)
                        version = str(info.registered_model_version)
                        result.update(model_name=name, model_uri=info.model_uri, model_version=version)
                        mlflow.set_tag(f"{TAG}registered_model", f"{name}/{version}")
                        tag_model_version(client, name, version, report, parent.info.run_id)
                        served = _log_servable(client, info, name, version, arts, tmp)
                        if served:
                            result["servable_uri"] = served
                        if key:
                            client.set_model_version_tag(name, version, f"{TAG}checkpoint_key", key)
    log.info("MLflow run %s (%s) logged to %s", result.get("run_id"), run_name, uri)
    return result


SERVABLE_DIR = "servable-vllm"


def _log_servable(client: MlflowClient, info, name: str, version: str, arts: Mapping[str, str], tmp: Path) -> str | None:
    """Put the run's servable folder (spec `export: vllm`) inside the registered model's artifacts, so
    `mlflow artifacts download -u models:/<name>/<version>/servable-vllm` gives a folder `vllm serve` loads.
    Tagged on the version as ``pruneflow.servable``."""
    ref = arts.get("servable_local") or arts.get("servable")
    local = _local_copy(ref, tmp) if ref else None
    if local is None or not (local / "config.json").exists() or not getattr(info, "model_id", None):
        return None
    client.log_model_artifacts(info.model_id, str(local.resolve()), artifact_path=SERVABLE_DIR)
    uri = f"models:/{name}/{version}/{SERVABLE_DIR}"
    client.set_model_version_tag(name, version, f"{TAG}servable", uri)
    return uri


def checkpoint_key(report: Mapping[str, Any]) -> str | None:
    """The checkpoint's content digest when the report has one (a manifest's sha256, or the sha256 in a
    content-addressed store URI); None for a plain folder, which is then always logged anew."""
    ref = (report.get("artifacts") or {}).get("checkpoint")
    if isinstance(ref, Mapping) and ref.get("sha256") and len(str(ref["sha256"])) >= 32:
        return str(ref["sha256"])
    m = re.search(r"(?<![0-9a-f])[0-9a-f]{64}(?![0-9a-f])", str(_artifact_path(ref) or ""))
    return m.group(0) if m else None


def _registration_lock(report: Mapping[str, Any], name: str, key: str | None):
    """The run's artifact store's lock for registering this checkpoint (a no-op without a key or store)."""
    if not key or not report.get("store"):
        return contextlib.nullcontext()
    from .store import open_store

    return open_store(str(report["store"])).lock(f"register-{sanitize_metric_name(name)}-{key[:32]}",
                                                  wait_message="MLflow: another run is registering this checkpoint")


def _registered_version(client: MlflowClient, name: str, key: str):
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    same = [mv for mv in versions if mv.tags.get(f"{TAG}checkpoint_key") == key]
    return min(same, key=lambda mv: int(mv.version)) if same else None


def version_tags(report: Mapping[str, Any], run_id: str | None = None) -> dict[str, str]:
    """The registry tags of a model version: gate figures (``pruneflow.ppl_ratio``...) and provenance."""
    tags = {f"{TAG}{k}": repr(v) for k, v in gate_figures(report).items()}
    tags.update({f"{TAG}method": str(report.get("method")), f"{TAG}model": str(report.get("model")),
                 f"{TAG}target_ratio": str(report.get("target_ratio"))})
    if run_id:
        tags[f"{TAG}run_id"] = run_id
    return tags


def tag_model_version(client: MlflowClient, name: str, version: str, report: Mapping[str, Any],
                      run_id: str | None = None) -> None:
    for k, v in version_tags(report, run_id).items():
        client.set_model_version_tag(name, version, k, v)


def _log_step(client: MlflowClient, exp_id: str, name: str, st: Mapping[str, Any]) -> str:
    cache = str(st.get("cache") or "miss")
    art = st.get("artifact") if isinstance(st.get("artifact"), Mapping) else {}
    key = st.get("cache_key") or st.get("key") or art.get("sha256")
    tags = {f"{TAG}step": name, f"{TAG}cache": cache}
    if key:
        tags[f"{TAG}cache_key"] = str(key)
    if cache == "hit":
        producer = st.get("producer_run") or find_producer_run(client, exp_id, key)
        if producer:
            tags[f"{TAG}producer_run_id"] = str(producer)
    with mlflow.start_run(experiment_id=exp_id, run_name=name, nested=True, tags=tags) as child:
        if isinstance(st.get("params"), Mapping) and st["params"]:
            mlflow.log_params({sanitize_metric_name(k): str(v)[:6000] for k, v in flatten(st["params"]).items()})
        m = {sanitize_metric_name(k): _num(v) for k, v in st.items()
             if k not in ("params", "cache", "cache_key", "producer_run") and _num(v) is not None}
        if m:
            mlflow.log_metrics(m)
        return child.info.run_id


def sweep_points(result: Mapping[str, Any] | list[Mapping[str, Any]]) -> list[dict]:
    """``[{"method", "ratio", "ppl", "acc", "params_after"}]`` from the sweep flow's result (``rows``) or
    from a list of run reports."""
    rows = result.get("rows", []) if isinstance(result, Mapping) else result
    points = []
    for r in rows:
        after = flatten(r.get("metrics_after") or {})
        ppl = _num(r.get("ppl_after"))
        points.append({"method": r.get("method"), "ratio": r.get("ratio", r.get("target_ratio")),
                       "ppl": ppl if ppl is not None else _find(after, "ppl"), "acc": _find(after, "acc"),
                       "params_after": _num(r.get("params_after"))})
    return points


def track_sweep(spec: Mapping[str, Any], result: Mapping[str, Any] | list[Mapping[str, Any]],
                run_dir: str | os.PathLike | None = None) -> dict:
    """One MLflow run for a sweep: params, the points table and the PPL / accuracy versus ratio plot.
    ``result``: the sweep flow's result dict (``rows``) or a list of run reports."""
    from pruning_core import plots

    settings = TrackingSettings.from_spec(spec)
    if not settings.enabled:
        return {"status": "disabled"}
    uri = resolve_tracking_uri(settings.uri)
    points = sweep_points(result)
    try:
        probe(uri, settings.probe_timeout_s)
        client = client_for(uri)
        exp_id = ensure_experiment(client, settings.experiment, uri)
        with using_uri(uri), tempfile.TemporaryDirectory() as tmpd, \
                mlflow.start_run(experiment_id=exp_id, run_name="sweep", tags={f"{TAG}kind": "sweep"}) as run:
            items = list(spec_params(spec).items())
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i:i + 100]))
            mlflow.log_dict({"points": points}, "sweep.json")
            if isinstance(result, Mapping):
                mlflow.log_dict(dict(result), "sweep_report.json")
            for i, p in enumerate(sorted(points, key=lambda p: (str(p["method"]), p["ratio"] or 0))):
                mlflow.log_metrics({k: p[k] for k in ("ppl", "acc", "ratio") if _num(p.get(k)) is not None}, step=i)
            try:
                mlflow.log_artifact(str(plots.plot_sweep(points, Path(tmpd) / "sweep.png")), artifact_path="plots")
            except Exception as e:
                log.warning("sweep plot skipped: %s", e)
            return {"status": "ok", "run_id": run.info.run_id, "uri": uri, "points": points}
    except Exception as e:
        if settings.on_failure == "fail":
            raise StorageError("tracking.uri", uri, "a reachable MLflow tracking store", str(e)[:200]) from e
        log.warning("MLflow sweep tracking failed: %s", e)
        return {"status": f"failed: {type(e).__name__}: {str(e)[:300]}", "run_id": None, "uri": uri}
