"""Export a pruned checkpoint as a folder a serving engine loads: `export_checkpoint(src, out, "vllm")`.

* **uniform** (every layer the same shape, no `pruneflow_layers` in the config): the folder already is a
  stock Hugging Face Llama/OPT/... folder; it is copied as is.
* **per-layer shapes** (Llama family): vLLM's DeciLM / Nemotron-NAS format
  (`vllm/model_executor/models/nemotron_nas.py`). `architectures = ["DeciLMForCausalLM"]`,
  `model_type = "nemotron-nas"` and one `block_configs` entry per layer:

      {"attention": {"no_op": bool, "replace_with_linear": false, "n_heads_in_group": q_heads / kv_heads},
       "ffn":       {"no_op": bool, "replace_with_linear": false, "intermediate_size": channels}}

  The query-head count is global (`num_attention_heads`), so it must be the same in every layer that
  keeps attention (prune with `servable: vllm`); KV heads and FFN widths are free per layer.
  A decoder layer becomes an attention+FFN block, LLM-Streamline's residual FFN x + MLP(norm(x)) an
  attention-no-op block (its norm saved as `post_attention_layernorm`; a searched attention-free layer is
  the same module), an FFN-free layer (`ffn` 0, `search.drop_blocks`) an FFN-no-op block without its
  zero-width MLP tensors, and a layer the plan removed a
  no-op block (both sides), so block i is the input model's layer i when `plan.json` tells the positions.
  Weights keep Llama's tensor names (`model.layers.<block>.self_attn.q_proj.weight`, ...).
  transformers has no `nemotron-nas` config class, so the folder carries `configuration_decilm.py`
  (written here, `auto_map` in config.json): load it with `trust_remote_code` (`vllm serve --trust-remote-code`).

* **anything else pruneflow writes** (Llama family: per-layer query heads — SlimGPT's default
  `gqa: per_group` —, per-layer biases such as FLAP's, an attention-free layer before the first
  attention, model types DeciLM does not cover such as Qwen2): the checkpoint's own folder with
  `architectures = ["PruneflowLlamaForCausalLM"]`, the model class of pruneflow's vLLM plugin
  (`pruneflow_vllm`, installed with `pip install pruneflow[serve]`); weights and `pruneflow_layers`
  unchanged, so a plain `vllm serve OUT` (no remote code) serves it.

`export_checkpoint` picks the lightest that holds the result (`layout_for`): stock, else DeciLM (stock
vLLM with `--trust-remote-code`), else the plugin. Pure: reads and writes files with safetensors / json;
no model is built and nothing is imported from transformers. Writes are atomic (temporary sibling
folder renamed into place).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .errors import ConfigError, DataError, StorageError
from .util import replace_dir, staged_dir

FORMATS = ("vllm",)
DECI_ARCH = "DeciLMForCausalLM"
DECI_MODEL_TYPE = "nemotron-nas"
PLUGIN_ARCH = "PruneflowLlamaForCausalLM"  # pruneflow_vllm.ARCH (that package imports vLLM, not pruneflow)
LAYOUTS = ("stock", "decilm", "plugin")
_PLUGIN_TYPES = ("llama", "mistral", "qwen2")  # the Llama family of pruning_core.adapters, less SmolLM3's NoPE
_LLAMA_TYPES = ("llama",)  # what the DeciLM modelling in vLLM reproduces (Llama attention + SwiGLU MLP)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")

# written next to config.json: the config class vLLM's DeciLM code reads (attribute access on block configs)
CONFIG_MODULE = '''"""DeciLM / Nemotron-NAS config for a pruneflow export: a Llama config plus per-layer `block_configs`.

Written by pruneflow (pruning_core/export.py). Each block config has `attention` (no_op, replace_with_linear,
n_heads_in_group) and `ffn` (no_op, replace_with_linear, intermediate_size), read as attributes.
"""

from transformers import LlamaConfig


class _Fields:
    """A JSON object read through attributes (block_config.attention.no_op); to_dict() gives it back."""

    def __init__(self, fields):
        for key, value in dict(fields).items():
            setattr(self, key, _Fields(value) if isinstance(value, dict) else value)

    def to_dict(self):
        return {k: (v.to_dict() if isinstance(v, _Fields) else v) for k, v in vars(self).items()}

    def __repr__(self):
        return repr(self.to_dict())


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [b if isinstance(b, _Fields) else _Fields(b) for b in (block_configs or [])]

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        return out
'''


def _read_config(src: Path) -> dict:
    f = src / "config.json"
    if not f.is_file():
        raise DataError("checkpoint", str(src), "a checkpoint folder with config.json")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise DataError("checkpoint", str(src), "a readable config.json", str(e)) from None


def _plan_positions(src: Path, n_layers: int) -> list[int | None] | None:
    """Per input-model layer: the index of the checkpoint layer it became, or None (removed).
    None when plan.json is missing or does not describe this checkpoint."""
    p = src / "plan.json"
    if not p.is_file():
        return None
    try:
        layers = json.loads(p.read_text())["layers"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    out, k = [], 0
    for lp in layers:
        if lp.get("keep", True):
            out.append(k)
            k += 1
        else:
            out.append(None)
    return out if k == n_layers else None


def block_configs(config: dict, positions: list[int | None] | None = None) -> tuple[list[dict], int]:
    """(DeciLM block configs, global query-head count) for a config with `pruneflow_layers`.

    Raises ConfigError when the layers cannot be expressed: query-head counts that differ between
    layers (naming the layer and the setting that avoids it), a layer kind without a DeciLM block, or
    an attention-less block before any attention (vLLM's residual stream starts at the first attention)."""
    layers = config["pruneflow_layers"]
    heads = {i: d["n_heads"] for i, d in enumerate(layers) if d["kind"] == "decoder"}
    n_q = next(iter(heads.values()), config.get("num_attention_heads"))
    for i, h in heads.items():
        if h != n_q:
            first = next(iter(heads))
            raise ConfigError(
                "export.format", "vllm",
                f"the same number of query heads in every layer (layer {i} keeps {h}, layer {first} keeps {n_q}); "
                "prune with `servable: vllm` (--set servable=vllm) to keep head counts equal across layers")
    blocks_by_layer = []
    for i, d in enumerate(layers):
        if d["kind"] == "decoder":
            if d["n_heads"] % d["n_kv_heads"]:
                raise ConfigError("export.format", "vllm", f"whole query heads per KV head (layer {i}: "
                                  f"{d['n_heads']} query / {d['n_kv_heads']} KV heads)")
            attn = {"no_op": False, "replace_with_linear": False, "n_heads_in_group": d["n_heads"] // d["n_kv_heads"]}
            ffn = {"no_op": not d["ffn"], "replace_with_linear": False,  # ffn 0: an FFN-free layer (drop_blocks)
                   "intermediate_size": int(d["ffn"]) or None}
        elif d["kind"] == "ffn":
            attn = {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
            ffn = {"no_op": False, "replace_with_linear": False, "intermediate_size": int(d["ffn"])}
        else:
            raise ConfigError("export.format", "vllm", f"decoder or ffn layers (layer {i} is {d['kind']!r}, "
                              "which has no DeciLM block)")
        blocks_by_layer.append({"attention": attn, "ffn": ffn})
    noop = {"attention": {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None},
            "ffn": {"no_op": True, "replace_with_linear": False, "intermediate_size": None}}
    blocks = blocks_by_layer if positions is None else \
        [blocks_by_layer[k] if k is not None else noop for k in positions]
    for j, b in enumerate(blocks):
        if not b["attention"]["no_op"]:
            break
        if not b["ffn"]["no_op"]:
            raise ConfigError("export.format", "vllm", f"an attention layer before the first attention-free FFN "
                              f"block (block {j}: vLLM's DeciLM starts its residual stream at an attention block)")
    return blocks, n_q


def _rename(name: str, kinds: list[str], block_of: list[int], no_ffn: frozenset = frozenset()) -> str | None:
    """The DeciLM name of a checkpoint tensor; None for one a no-op block has no place for (the zero-width
    MLP and its norm of an FFN-free layer, index in `no_ffn`)."""
    m = _LAYER.match(name)
    if not m:
        return name
    i, rest = int(m.group(1)), m.group(2)
    if i in no_ffn and rest.startswith(("mlp.", "post_attention_layernorm.")):
        return None
    if kinds[i] == "ffn" and rest.startswith("norm."):
        rest = "post_attention_layernorm." + rest[len("norm."):]
    return f"model.layers.{block_of[i]}.{rest}"


def _write_weights(src: Path, dst: Path, kinds: list[str], block_of: list[int],
                   no_ffn: frozenset = frozenset()) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise DataError("checkpoint", str(src), "a checkpoint folder with safetensors weights")
    identity = all(k == "decoder" for k in kinds) and block_of == list(range(len(kinds))) and not no_ffn
    renamed = {}
    for f in files:
        if identity:
            shutil.copy2(f, dst / f.name)
            continue
        with safe_open(str(f), framework="pt") as sf:
            meta = sf.metadata() or {}
            tensors = {}
            for k in sf.keys():
                new = _rename(k, kinds, block_of, no_ffn)
                renamed[k] = new
                if new is not None:
                    tensors[new] = sf.get_tensor(k)
        save_file(tensors, str(dst / f.name), metadata={**meta, "format": meta.get("format", "pt")})
    index = src / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        if not identity:
            data["weight_map"] = {renamed.get(k, k): v for k, v in data.get("weight_map", {}).items()
                                  if renamed.get(k, k) is not None}
        (dst / index.name).write_text(json.dumps(data, indent=2))


def _decilm_bias_mismatch(config: dict) -> str | None:
    """Why vLLM's DeciLM would build other biases than the layers carry (it has one flag for q/k/v/o and
    one for the MLP), or None."""
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"] if config.get("attention_bias") else []
    mlp = ["gate_proj", "up_proj", "down_proj"] if config.get("mlp_bias") else []
    for i, d in enumerate(config["pruneflow_layers"]):
        if d["kind"] == "decoder" and "bias" in d and sorted(d["bias"]) != sorted(attn + mlp):
            return f"layer {i} has biases on {sorted(d['bias']) or 'no projection'}, DeciLM builds {sorted(attn + mlp)}"
    return None


def _plugin_check(config: dict) -> None:
    """ConfigError when even pruneflow's vLLM plugin cannot serve the checkpoint."""
    mt = config.get("model_type")
    if mt not in _PLUGIN_TYPES:
        raise ConfigError("export.format", "vllm", f"a uniform checkpoint for model type {mt!r} (per-layer sizes are "
                          f"served through Llama-family model classes: {', '.join(_PLUGIN_TYPES)})")
    for i, d in enumerate(config["pruneflow_layers"]):
        if d["kind"] not in ("decoder", "ffn"):
            raise ConfigError("export.format", "vllm", f"decoder or ffn layers (layer {i} is {d['kind']!r})")
        if d["kind"] == "decoder" and d["n_heads"] and (not d["n_kv_heads"] or d["n_heads"] % d["n_kv_heads"]):
            raise ConfigError("export.format", "vllm", f"whole query heads per KV head (layer {i}: "
                              f"{d['n_heads']} query / {d['n_kv_heads']} KV heads)")


def layout_for(config: dict, positions: list[int | None] | None = None) -> tuple[str, str]:
    """(layout, why) of the lightest format that serves a checkpoint with this config.json: `stock`
    (uniform), `decilm` (stock vLLM, per-layer KV heads / FFN widths) or `plugin` (pruneflow's vLLM
    plugin). ConfigError when none does."""
    if not config.get("pruneflow_layers"):
        return "stock", "every layer has the same shape"
    _plugin_check(config)
    if config.get("model_type") not in _LLAMA_TYPES:
        return "plugin", f"model type {config.get('model_type')!r} has no DeciLM form"
    heads = [(i, d["n_heads"]) for i, d in enumerate(config["pruneflow_layers"]) if d["kind"] == "decoder"]
    bad = next(((i, h) for i, h in heads if h != heads[0][1]), None)
    if bad:
        return "plugin", f"query heads differ between layers (layer {bad[0]} keeps {bad[1]}, layer {heads[0][0]} " \
                         f"keeps {heads[0][1]}; `servable: vllm` keeps them equal)"
    try:
        block_configs(config, positions)
    except ConfigError as e:
        return "plugin", e.accepted
    bad = _decilm_bias_mismatch(config)
    return ("plugin", bad) if bad else ("decilm", "one query-head count in every layer")


def export_checkpoint(src: str | Path, out: str | Path, fmt: str = "vllm") -> dict:
    """Write a servable copy of checkpoint `src` to `out`. Returns {"path", "format", "layout", "blocks",
    "why"}: layout "stock" (copied as is), "decilm" (per-layer block configs) or "plugin" (pruneflow's
    vLLM plugin architecture); `why` says what made it the lightest one."""
    if fmt not in FORMATS:
        raise ConfigError("export.format", fmt, ", ".join(FORMATS))
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_dir():
        raise DataError("checkpoint", str(src), "a checkpoint folder (written by pruneflow or Hugging Face)")
    config = _read_config(src)
    if out.resolve() == src.resolve():
        raise StorageError("export.out", str(out), "a folder other than the checkpoint itself")
    layers = config.get("pruneflow_layers")
    positions = _plan_positions(src, len(layers)) if layers else None
    layout, why = layout_for(config, positions)
    with staged_dir(out, "export.out") as tmp:
        for f in src.iterdir():  # tokenizer, generation config, plan.json, ...
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json",
                                                                          "model.safetensors.index.json"):
                shutil.copy2(f, tmp / f.name)
        if layout != "decilm":  # the weights as they are
            for f in src.glob("*.safetensors"):
                shutil.copy2(f, tmp / f.name)
            if (src / "model.safetensors.index.json").is_file():
                shutil.copy2(src / "model.safetensors.index.json", tmp / "model.safetensors.index.json")
        if layout == "stock":
            shutil.copy2(src / "config.json", tmp / "config.json")
            blocks = config.get("num_hidden_layers")
        elif layout == "plugin":
            cfg = {**config, "architectures": [PLUGIN_ARCH],
                   "pruneflow_export": {"format": fmt, "layout": layout, "needs": "pip install pruneflow[serve]"}}
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
            blocks = len(layers)
        else:
            blocks = _write_decilm(src, tmp, config, positions, fmt)
        replace_dir(tmp, out)
    return {"path": str(out), "format": fmt, "layout": layout, "blocks": blocks, "why": why}


def _write_decilm(src: Path, tmp: Path, config: dict, positions: list[int | None] | None, fmt: str) -> int:
    layers = config["pruneflow_layers"]
    blocks, n_q = block_configs(config, positions)
    kinds = [d["kind"] for d in layers]
    block_of = list(range(len(layers))) if positions is None else [positions.index(k) for k in range(len(layers))]
    no_ffn = frozenset(i for i, d in enumerate(layers) if d["kind"] == "decoder" and not d["ffn"])
    _write_weights(src, tmp, kinds, block_of, no_ffn)
    attn = next(b["attention"] for b in blocks if not b["attention"]["no_op"])
    cfg = {k: v for k, v in config.items() if k != "pruneflow_layers"}
    cfg.update(architectures=[DECI_ARCH], model_type=DECI_MODEL_TYPE, num_hidden_layers=len(blocks),
               num_attention_heads=n_q, num_key_value_heads=n_q // attn["n_heads_in_group"],
               intermediate_size=max(b["ffn"]["intermediate_size"] or 0 for b in blocks),
               block_configs=blocks, auto_map={"AutoConfig": "configuration_decilm.DeciLMConfig"},
               pruneflow_export={"format": fmt, "source_layers": len(layers)})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "configuration_decilm.py").write_text(CONFIG_MODULE)
    return len(blocks)
