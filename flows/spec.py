"""The run spec: one typed, validated object (unknown keys rejected), from YAML + command-line overrides.

    model:        {ref, dtype, placement, revision, trust_remote_code}
    calibration:  {source, n_samples, seq_len, seed}
    method:       {name, settings}        settings validated by the method's own settings model
    ratio:        target fraction of decoder-layer parameters removed, in [0, 1) — the same meaning for
                  every method; each converts it to its own units (heads, channels, whole layers) and
                  the report gives the realised figure
    params:       alternative target: parameters left (100M, 1.2B or an integer); sets `ratio`
    schedule:     per-layer ratio schedule (None: the method's default, usually uniform)
    servable:     none|vllm: plan for *stock* vLLM, without pruneflow's plugin (the same query-head count
                  in every layer; FFN widths free); copied into method.settings.servable. Default: none
    export:       {format: none|vllm} (or `export: vllm`): the run ends with a servable folder
                  (<run_dir>/servable-vllm: the stock folder, vLLM's DeciLM format, or pruneflow's vLLM
                  plugin architecture, the lightest that serves the result). Default: vllm
    recovery:     {kind: none|lora|replacement|distill, settings}  (distill: KL to the dense model's stored
                  top-k log-probs, the `teacher` step; after LLM-Streamline's replacement is trained).
                  Default: distill for the embedded default model (its measured recipe), none for any other
    evaluation:   {source, ppl_seq_len, ppl_windows, tasks, limit, efficiency, batch_size}
    store:        {url}                   local folder (default $PRUNEFLOW_HOME/artifacts) or s3://bucket/prefix
    tracking:     {enabled, uri, experiment, on_failure: warn|fail, log_model}
    device:       auto|cpu|cuda|cuda:N
    seed:         the run's seed: the default of every seed in it not given explicitly (calibration.seed,
                  method.settings.seed of seeded methods, recovery.settings.seed of LoRA and distillation)
    name:         run name: the folder under $PRUNEFLOW_HOME/runs (one path component). Default: the
                  readable `<model>-<method>-<ratio>` plus a short digest of the resolved spec
                  (`run_id`), so runs that differ in any setting never share a folder

Every validation problem becomes a `ConfigError` naming the dotted field, the value and what is accepted.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pruning_core.errors import ConfigError

_NAME_RE = re.compile(r"[A-Za-z0-9_+=@-][A-Za-z0-9._+=@-]{0,119}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    ref: str = "smollm2-135m"  # embedded name, local folder, hub id org/name, or s3:// folder
    # auto: the checkpoint's own dtype on CUDA, float32 on CPU (statistics are fp32/fp64 regardless)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # where the weights live while a step runs (pruning_core.residency); auto picks by free memory
    placement: Literal["auto", "device", "offload", "disk"] = "auto"
    revision: str | None = None
    trust_remote_code: bool = False


class CalibrationSpec(_Strict):
    source: str = "pydoc"
    n_samples: int = Field(64, ge=1, le=100_000)
    seq_len: int = Field(256, ge=2, le=131_072)
    seed: int = 0
    batch_size: int = Field(8, ge=1)


class MethodSpec(_Strict):
    name: str = "wanda"
    settings: dict[str, Any] = Field(default_factory=dict)


class RecoverySpec(_Strict):
    kind: Literal["none", "lora", "replacement", "distill"] = "none"
    settings: dict[str, Any] = Field(default_factory=dict)


class EvaluationSpec(_Strict):
    source: str = "pydoc"
    ppl_seq_len: int = Field(256, ge=2)
    ppl_windows: int | None = Field(16, ge=1)
    tasks: list[str] = Field(default_factory=list)
    limit: int | None = Field(None, ge=1)
    efficiency: bool = False
    batch_size: int = Field(1, ge=1)
    # with a recovery: evaluate the pruned model before it as well (the report's and the console's
    # "before recovery" column), so what the recovery gave back is in the same table
    before_recovery: bool = True


class ExportSpec(_Strict):
    format: Literal["none", "vllm"] = "none"


class StoreSpec(_Strict):
    url: str | None = None


class TrackingSpec(_Strict):
    enabled: bool = True
    uri: str | None = None
    experiment: str = "pruneflow"
    on_failure: Literal["warn", "fail"] = "warn"
    log_model: bool = True  # register the checkpoint folder as an MLflow model (copied as it is, never loaded)


def _searchable() -> list[str]:
    from pruning_core.methods import list_methods

    return [m.name for m in list_methods() if "search" in m.settings.model_fields]


class RunSpec(_Strict):
    name: str | None = None
    model: ModelSpec = Field(default_factory=ModelSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    method: MethodSpec = Field(default_factory=MethodSpec)
    ratio: float = Field(0.2, ge=0.0, lt=1.0)
    params: int | None = Field(None, ge=1)  # alternative target: parameters left (sets `ratio`, see preflight)
    schedule: str | None = None
    # `schedule: search` (pruning_core/search.py): its settings, and a serving-memory budget instead of ratio
    search: dict | None = None
    budget: dict | None = None
    servable: Literal["none", "vllm"] | None = None
    export: ExportSpec = Field(default_factory=ExportSpec)
    recovery: RecoverySpec = Field(default_factory=RecoverySpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    store: StoreSpec = Field(default_factory=StoreSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    device: str = "auto"
    seed: int = 0

    @field_validator("store", mode="before")
    @classmethod
    def _store_str(cls, v):
        return {"url": v} if isinstance(v, str) or v is None else v

    @field_validator("export", mode="before")
    @classmethod
    def _export_str(cls, v):
        return {"format": v} if isinstance(v, str) or v is None else v

    @field_validator("params", mode="before")
    @classmethod
    def _params(cls, v):
        return parse_count(v, "params") if v is not None else None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not _NAME_RE.fullmatch(v) or v in (".", ".."):
            raise ConfigError("name", v, "one folder name of letters, digits and . _ - + = @ (no path "
                              "separators, not starting with a dot), at most 120 characters")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit()):
            return v
        raise ValueError("auto, cpu, cuda or cuda:N")

    @model_validator(mode="after")
    def _method(self):
        from pruning_core.methods import get_method

        m = get_method(self.method.name)  # ConfigError for an unknown name
        raw = dict(self.method.settings)
        # `seed` seeds whatever the spec does not seed explicitly (so it enters the steps' keys through them)
        if "seed" not in self.calibration.model_fields_set:
            self.calibration.seed = self.seed
        if "seed" in m.settings.model_fields and "seed" not in raw:
            raw["seed"] = self.seed
        if self.schedule is not None:
            if "schedule" not in m.settings.model_fields:
                raise ConfigError("schedule", self.schedule, f"no schedule (method {m.name!r} has none)")
            raw["schedule"] = self.schedule
        for key in ("search", "budget"):
            v = getattr(self, key)
            if v is None:
                continue
            if key not in m.settings.model_fields:
                raise ConfigError(key, v, f"no {key} for method {m.name!r} (schedule: search is offered by "
                                          f"{', '.join(_searchable())})")
            if not isinstance(v, dict):
                raise ConfigError(key, v, "a mapping" + (" {memory_mb, seq_len, batch, bytes_per_param}"
                                                         if key == "budget" else " of search settings"))
            raw[key] = v
        if self.budget is not None:
            if (self.schedule or raw.get("schedule")) != "search":
                raise ConfigError("budget", self.budget, "schedule: search alongside (a memory budget is met by "
                                                         "searching the per-layer widths)")
            if self.params is not None:  # (ratio always has its default; a budget replaces it)
                raise ConfigError("budget", self.budget, "either budget or params, not both")
        if self.servable is not None:  # pruneflow's vLLM plugin serves any result: the constraint is opt-in
            raw["servable"] = self.servable
        self.method.settings = m.parse_settings(raw).model_dump(mode="json")
        sched = self.method.settings.get("schedule")
        if isinstance(sched, str):
            from pruning_core.select import SCHEDULES

            if sched == "search" and "search" not in m.settings.model_fields:
                raise ConfigError("schedule", sched, ", ".join(sorted(SCHEDULES)) + f" for {m.name!r} (search: "
                                  + ", ".join(_searchable()) + ")")
            if sched not in SCHEDULES and sched != "search":
                field = "schedule" if self.schedule is not None else "method.settings.schedule"
                raise ConfigError(field, sched, ", ".join(sorted(SCHEDULES)))
        if self.recovery.kind == "lora":
            from pruning_core.recover import parse_settings

            self.recovery.settings = parse_settings({"seed": self.seed, **self.recovery.settings}).model_dump(mode="json")
        elif self.recovery.kind == "distill":
            from pruning_core.distill import TEACHER_SAMPLES
            from pruning_core.distill import parse_settings as distill_settings

            self.recovery.settings = distill_settings({"seed": self.seed, **self.recovery.settings}).model_dump(mode="json")
            if self.recovery.settings["mix_samples"] and self.recovery.settings["source"] == TEACHER_SAMPLES:
                raise ConfigError("recovery.settings.mix_samples", self.recovery.settings["mix_samples"],
                                  f"0 when source is {TEACHER_SAMPLES} (its blocks are samples already: use n_blocks)")
        elif self.recovery.kind == "replacement":
            if "replacement" not in m.settings.model_fields:
                raise ConfigError("recovery.kind", "replacement",
                                  f"none, lora or distill for {m.name!r} (replacement layers are trained by llm-streamline)")
            if self.method.settings.get("replacement") not in ("layer", "ffn"):
                raise ConfigError("recovery.kind", "replacement", "none, lora or distill with method.settings.replacement "
                                  f"{self.method.settings.get('replacement')!r} (only layer and ffn are trained)")
            if self.recovery.settings:
                raise ConfigError("recovery.settings", self.recovery.settings,
                                  "{} for replacement (set it in method.settings)")
        return self

    def run_name(self) -> str:
        """The readable name: `name`, or `<model>-<method>-<ratio>`."""
        if self.name:
            return self.name
        model = Path(self.model.ref.rstrip("/")).name or "model"
        return f"{model}-{self.method.name}-{self.ratio:g}"

    def digest(self) -> str:
        """A short digest of everything that shapes the run's results (not its name, store, tracking,
        device or placement, which change where and how, not what)."""
        import hashlib
        import json

        d = self.model_dump(mode="json", exclude={"name", "store", "tracking", "device"})
        d["model"].pop("placement", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]

    def run_id(self) -> str:
        """The run's folder under $PRUNEFLOW_HOME/runs: `name` when given, else the readable name and
        the spec's digest (runs differing in settings, recovery or calibration never share a folder)."""
        return self.name or f"{self.run_name()}-{self.digest()}"


def distill_data(spec: RunSpec) -> dict:
    """The distillation blocks as calibration-step arguments: the calibration's unless set."""
    d, c = spec.recovery.settings, spec.calibration
    return {"source": d.get("source") or c.source, "n_samples": d.get("n_blocks") or c.n_samples,
            "seq_len": d.get("seq_len") or c.seq_len, "seed": c.seed if d.get("data_seed") is None else d["data_seed"]}


DEFAULT_SPEC: dict[str, Any] = {
    # the embedded default: SmolLM2-135M, pydoc text, SlimGPT (per_group, heads at 0.75 r, log-increase) at 20 %
    # of the decoder layers' parameters: the papers' method with the lowest out-of-domain PPL
    # (benchmarks/RESULTS.md, ood-slimgpt); 64 x 256 calibration tokens, the knee of ood-calib
    "model": {"ref": "smollm2-135m"},
    "calibration": {"source": "pydoc", "n_samples": 64, "seq_len": 256},  # seed: the run's `seed`
    "method": {"name": "slimgpt", "settings": {}},
    "ratio": 0.2,
    # distillation from the dense model (issue 20): the decoder's weights learn the dense model's top-64
    # next-token distribution on the 64 calibration blocks plus 64 blocks the dense model samples, 30 steps
    # x 4 x 256 tokens, lr 2e-4 — the best out-of-domain recovery that fits `make run`'s ten minutes
    # (benchmarks/RESULTS.md, distill sections). It applies to this model only (`with_defaults`); the
    # console shows the pruned model without it too
    "recovery": {"kind": "distill", "settings": {"steps": 30, "mix_samples": 64}},
    # fixed-window perplexity on the held-out text + one offline lm-eval task (built from the same text)
    "evaluation": {"ppl_seq_len": 256, "ppl_windows": 16, "tasks": ["pydoc_next_sentence"], "limit": 50},
    # the run ends with <run_dir>/servable-vllm, which the summary's "serve it" line serves as it is
    "export": {"format": "vllm"},
}


_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_count(v: Any, field: str = "params") -> int:
    """100M, 1.2B, 350k or a plain integer -> an integer count (ConfigError otherwise)."""
    if isinstance(v, bool):
        raise ConfigError(field, v, "a parameter count such as 100M, 1.2B or 100000000")
    if isinstance(v, (int, float)) and v >= 1:
        return int(v)
    text = str(v).strip().lower().replace("_", "").replace(",", "")
    mult = _SUFFIX.get(text[-1:], 1) if text else 1
    try:
        n = float(text[:-1] if mult != 1 else text) * mult
    except ValueError:
        raise ConfigError(field, v, "a parameter count such as 100M, 1.2B or 100000000") from None
    if not n >= 1:
        raise ConfigError(field, v, "a parameter count >= 1, such as 100M")
    return int(round(n))


def _loc(err: dict) -> str:
    return ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-after"))


def validate(raw: dict[str, Any]) -> RunSpec:
    """A RunSpec from a plain dict; the first problem as a ConfigError (one line)."""
    if not isinstance(raw, dict):
        raise ConfigError("spec", type(raw).__name__, "a mapping of run settings (YAML)")
    try:
        return RunSpec(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = _loc(err) or "spec"
        if err["type"] == "extra_forbidden":
            parent = _model_at(err["loc"][:-1])
            accepted = "one of " + ", ".join(sorted(parent.model_fields)) if parent else "a known key"
            raise ConfigError(loc, err["loc"][-1], accepted) from None
        ctx = err.get("ctx", {}).get("error")
        if isinstance(ctx, ConfigError):
            raise ctx from None
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(loc, err.get("input"), msg) from None


def _model_at(loc) -> type[BaseModel] | None:
    m: type[BaseModel] = RunSpec
    for part in loc:
        f = m.model_fields.get(str(part))
        if f is None:
            return None
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            m = ann
        else:
            return None
    return m


def parse_value(text: str) -> Any:
    """A command-line value: YAML scalars/lists (0.3, true, null, [a, b]) or the plain string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def set_dotted(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(dotted, value, f"a field inside a mapping ({p!r} is not one)")
        cur = nxt
    cur[parts[-1]] = value


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError("spec", str(path), "an existing YAML file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise ConfigError("spec", str(path), f"valid YAML (parse error at {where})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("spec", str(path), "a YAML mapping of run settings")
    return data


def _merge(base: Any, top: Any) -> Any:
    """`top` over `base`, mapping by mapping; anything else (scalars, lists) in `top` replaces."""
    if isinstance(base, dict) and isinstance(top, dict):
        out = dict(base)
        for k, v in top.items():
            out[k] = _merge(base.get(k), v) if k in base else v
        return out
    return top


def with_defaults(user: dict[str, Any]) -> dict[str, Any]:
    """The one rule for defaults: DEFAULT_SPEC under what the user gave (file, `--set`, options),
    merged field by field — so no file, an empty file and a file all start from the same defaults.
    `method.settings` of the default method apply only while the method *is* the default one: a
    method's settings never come from another method's defaults (its own settings model fills them)."""
    raw = _merge(copy.deepcopy(DEFAULT_SPEC), user)
    default_method = DEFAULT_SPEC.get("method", {})
    if isinstance(raw.get("method"), dict) and raw["method"].get("name") != default_method.get("name"):
        um = user.get("method") if isinstance(user.get("method"), dict) else {}
        raw["method"] = {**raw["method"], "settings": copy.deepcopy(um.get("settings", {}))}
    if isinstance(raw.get("recovery"), dict):
        ur = user.get("recovery") if isinstance(user.get("recovery"), dict) else {}
        model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
        if model.get("ref") != DEFAULT_SPEC["model"]["ref"]:
            # the default recovery is the embedded default's measured recipe (a 135 M model trained in
            # minutes on a CPU); another model starts from none: full-weight training of a 7-70 B model is
            # a decision (memory, placement, time), not a default
            raw["recovery"] = copy.deepcopy(ur)
        elif raw["recovery"].get("kind") != DEFAULT_SPEC["recovery"]["kind"]:  # another kind: its own settings
            raw["recovery"] = {**raw["recovery"], "settings": copy.deepcopy(ur.get("settings", {}))}
    return raw


def build_spec(path: str | Path | None = None, overrides: list[str] | None = None, **direct: Any) -> RunSpec:
    """The spec: DEFAULT_SPEC, under the YAML file (if any), `--set a.b=v` overrides, then direct ones
    (see `with_defaults` for the one rule)."""
    user = {} if path is None else load_yaml(path)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError("--set", item, "key=value with a dotted key, e.g. method.name=l2")
        k, v = item.split("=", 1)
        set_dotted(user, k.strip(), parse_value(v))
    for k, v in direct.items():
        if v is not None:
            set_dotted(user, k, v)
    if user.get("params") is not None and user.get("ratio") is not None:
        raise ConfigError("params", user["params"], f"either params or ratio, not both (ratio {user['ratio']!r} "
                          "is given too; params sets the ratio)")
    return validate(with_defaults(user))
