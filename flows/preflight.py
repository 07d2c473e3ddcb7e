"""Pre-flight checks: every user error that can be known before computing, raised before any step runs.

`pruneflow run`, `sweep` and `plan` call `preflight(spec)` after the spec is validated and before
Prefect is imported, so a bad input costs a second and prints one line (`error: <field>: ...`, exit 2):

* the model: an embedded name, a folder with `config.json`, an s3:// folder with `config.json`, or a hub
  id (only when the hub is reachable);
* its architecture (`config.json`'s `model_type`) has an adapter;
* its safetensors files are whole (headers parse, tensor extents fit the file sizes; no weight is read);
* the device exists here (`cuda` on a machine without one is refused);
* the text sources exist / can be read (calibration and evaluation);
* the calibration set fits the text: `n_samples` blocks of `seq_len` tokens (tokenised only when the
  character count leaves it in doubt);
* the lm-eval task names are known (standard tasks only while the hub is reachable);
* the ratio or `--params` target is reachable for the method (depth methods keep at least one layer).

Nothing here imports Prefect, MLflow or s3fs, and no weight is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pruning_core.errors import ConfigError, DataError

from .spec import RunSpec, distill_data

CHARS_PER_TOKEN_MAX = 12  # a text averaging more characters per token than this is not plausible (BPE: ~4)


def model_config(ref: str) -> tuple[dict[str, Any], Path | None]:
    """(config dict, local folder or None) for a model ref; DataError / ConfigError when unusable."""
    from pruning_core.models import EMBEDDED, _gguf_location, home

    if ref in EMBEDDED:
        pkg, fname, arch = EMBEDDED[ref]
        folder = home() / "models" / ref
        if (folder / "config.json").exists() and (folder / "model.safetensors").exists():
            return _read_config(ref, folder), folder
        _gguf_location(pkg, fname)  # the package that ships it is installed (converted on first load)
        return {"architectures": [arch], "model_type": "llama"}, None
    if ref.startswith("s3://"):  # its config.json only (one LIST, one GET): the weights are fetched by `load`
        from pruning_core.models import s3_config

        try:
            return s3_config(ref), None
        except DataError as e:
            raise DataError("model.ref", e.value, e.accepted, e.hint) from None
    p = Path(os.path.expanduser(ref))
    if not p.exists() and ("/" in ref or ref.startswith((".", "~"))):
        from pruning_core.util import recover_dir

        recover_dir(p)  # a writer killed between replace_dir's renames left `.name.old-PID`
    if p.exists():
        if not p.is_dir() or not (p / "config.json").exists():
            raise DataError("model.ref", ref, "a folder with config.json (a Hugging Face checkpoint)")
        return _read_config(ref, p), p
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise DataError("model.ref", ref, "an existing model folder, a hub id 'org/name', s3://bucket/prefix or "
                        + ", ".join(EMBEDDED))
    from pruning_core.evaluate import hub_reachable

    if not hub_reachable():  # offline: a hub id is usable when the Hugging Face cache holds it
        from pruning_core.errors import PruneflowError
        from pruning_core.models import resolve_source

        try:
            folder = Path(resolve_source(ref)[0])
        except PruneflowError:
            raise DataError("model.ref", ref, "a local folder, a hub id in the Hugging Face cache or "
                            + ", ".join(EMBEDDED), "the hub is offline: HF_HUB_OFFLINE=1") from None
        return _read_config(ref, folder), folder
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(ref).to_dict()
    except Exception as e:  # noqa: BLE001 - unreachable hub, unknown repo, gated model
        raise DataError("model.ref", ref, "a reachable Hugging Face model id", str(e).splitlines()[0][:120]) from None
    return cfg, None


def _read_config(ref: str, folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise DataError("model.ref", ref, "a folder whose config.json is valid JSON", str(e)[:80]) from None
    if not isinstance(cfg, dict):
        raise DataError("model.ref", ref, "a folder whose config.json is a JSON object")
    return cfg


def check_architecture(ref: str, cfg: dict[str, Any]) -> None:
    from pruning_core.adapters import adapter_for, supported_architectures

    mt = cfg.get("model_type")
    try:
        adapter_for(SimpleNamespace(model_type=mt))
    except ConfigError:
        raise ConfigError("model.ref", ref, "a model of a supported architecture (model_type "
                          + ", ".join(supported_architectures()) + ")",
                          f"its config.json says model_type {mt!r}") from None


def check_device(device: str) -> None:
    if device in ("auto", "cpu"):
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("device", device, "auto or cpu (no CUDA device is visible here)")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ConfigError("device", device, f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")


def _text(source: str, split: str, field: str) -> str:
    from pruning_core.data import load_text

    try:
        return load_text(source, split)
    except DataError as e:
        raise DataError(field, e.value, e.accepted, e.hint) from None


def _count_tokens(folder: Path | None, text: str, trust_remote_code: bool) -> int | None:
    if folder is None:
        return None
    if (folder / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        return len(Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids)
    from pruning_core.loading import _load_tokenizer

    tok = _load_tokenizer(folder, trust_remote_code)
    if tok is None:
        raise DataError("model.ref", str(folder), "a model folder with a tokenizer")
    return len(tok(text, add_special_tokens=False)["input_ids"])


def check_blocks(spec: RunSpec, folder: Path | None, source: str, n_samples: int, seq_len: int, field: str) -> None:
    """`n_samples` blocks of `seq_len` tokens fit the training part of `source` (`field`: where it was set)."""
    text = _text(source, "train", f"{field}.source")
    need = n_samples * seq_len
    if need * CHARS_PER_TOKEN_MAX <= len(text):
        return
    n_tok = _count_tokens(folder, text, spec.model.trust_remote_code)
    if n_tok is None:  # not converted yet: a bound from characters (one token has at least one character)
        n_tok = len(text)
    n_chunks = n_tok // seq_len
    if n_chunks < n_samples:
        name = "n_samples" if field == "calibration" else "n_blocks"
        raise DataError(f"{field}.{name}", n_samples, f"at most {n_chunks} samples of {seq_len} tokens from {source!r} "
                        f"({n_tok} tokens in its training part)")


def check_calibration(spec: RunSpec, folder: Path | None) -> None:
    c = spec.calibration
    check_blocks(spec, folder, c.source, c.n_samples, c.seq_len, "calibration")


def check_recovery(spec: RunSpec, folder: Path | None, data: bool = True) -> None:
    """LoRA and distillation train with every weight resident: not under `disk`, nor `offload` on a GPU;
    distillation's text is a training text (pkgdocs is evaluation-only) with enough blocks."""
    kind = spec.recovery.kind
    if kind not in ("lora", "distill"):
        return
    pl = spec.model.placement
    if pl == "disk" or (pl == "offload" and spec.device not in ("cpu", "auto")):
        raise ConfigError("model.placement", pl, f"device or auto for {kind} recovery (offload only on a CPU device)")
    if kind == "distill" and data:
        from pruning_core.distill import TEACHER_SAMPLES

        d = distill_data(spec)
        if d["source"] == TEACHER_SAMPLES:  # written by the dense model: any number of blocks
            return
        check_blocks(spec, folder, d["source"], d["n_samples"], d["seq_len"], "recovery.settings")


def check_evaluation(spec: RunSpec) -> None:
    e = spec.evaluation
    text = _text(e.source, "eval", "evaluation.source")
    if not text.strip():
        raise DataError("evaluation.source", e.source, "a text with an evaluation part (it is empty)")
    if e.tasks:
        from pruning_core.evaluate import check_tasks

        check_tasks(list(e.tasks))


def check_target(spec: RunSpec, cfg: dict[str, Any]) -> None:
    """Depth methods keep at least one layer (the budget is known from the config alone)."""
    from pruning_core.methods import get_method

    meth = get_method(spec.method.name)
    n = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers")
    if "layers" not in meth.targets or not n:
        return
    fixed = (spec.method.settings or {}).get("n_layers")
    k = int(fixed) if fixed else round(spec.ratio * int(n))
    if k > int(n) - 1:
        field, val = ("method.settings.n_layers", fixed) if fixed else ("ratio", spec.ratio)
        raise ConfigError(field, val, f"a value that removes at most {int(n) - 1} of {n} layers")


def param_budget(spec: RunSpec, cfg: dict | None = None) -> tuple[int, int]:
    """(all parameters, decoder-layer parameters) of the model, from its config on the meta device
    (`cfg`: a config.json's content instead of the model ref's)."""
    from pruning_core.adapters import adapter_for

    from .dryrun import _meta_model

    model = _meta_model(spec.model.ref, spec.model.trust_remote_code, cfg=cfg)
    total = sum(p.numel() for p in model.parameters())
    decoder = sum(p.numel() for layer in adapter_for(model).layers(model) for p in layer.parameters())
    return total, decoder


def resolve_params_target(spec: RunSpec, cfg: dict | None = None) -> RunSpec:
    """`params: 100M` -> the ratio of decoder-layer parameters that leaves that many (in place)."""
    if spec.params is None:
        return spec
    total, decoder = param_budget(spec, cfg)
    lo = total - decoder
    r = (total - spec.params) / decoder
    if not 0.0 <= r < 1.0:
        raise ConfigError("params", spec.params, f"a count between {lo / 1e6:.1f}M (exclusive) and {total / 1e6:.1f}M "
                          f"({spec.model.ref} has {total} parameters, {decoder} of them in decoder layers)")
    spec.ratio = round(r, 6)
    return spec


def preflight(spec: RunSpec, *, data: bool = True, cfg: dict | None = None) -> dict[str, Any]:
    """Run every check (`spec.ratio` is set from `spec.params` when given); returns {"config": model
    config, "folder": local folder or None}. `data=False` skips the text and lm-eval checks. `cfg`: the
    model's config.json content, given instead of reading the model ref's (a recipe planned offline)."""
    given = cfg
    cfg, folder = (cfg, None) if cfg is not None else model_config(spec.model.ref)
    check_architecture(spec.model.ref, cfg)
    if folder is not None:  # a truncated or garbage weight file: from the headers, no weight is read
        from pruning_core.safetensors_check import check_weights

        check_weights(folder, ref=spec.model.ref)
    check_device(spec.device)
    resolve_params_target(spec, given)
    check_target(spec, cfg)
    if data:
        check_calibration(spec, folder)
        check_evaluation(spec)
    check_recovery(spec, folder, data)
    return {"config": cfg, "folder": folder}
