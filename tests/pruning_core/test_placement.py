"""model.placement: device, offload and disk give identical results (fp32, tiny model) for every
registered method, through capture, scoring / coupled pruning, streaming save and reload."""

from __future__ import annotations

import json

import pytest
import torch

from pruning_core import adapter_for, capture_stats, tiny_model
from pruning_core.checkpoint import load_pruned, save_pruned, save_streaming
from pruning_core.loading import open_model
from pruning_core.memory import choose_placement
from pruning_core.methods import get_method, list_methods
from pruning_core.metrics import perplexity
from pruning_core.residency import home_of, is_resident
from pruning_core.surgery import apply_plan

pytestmark = pytest.mark.usefixtures("one_thread")

PLACEMENTS = ("device", "offload", "disk")
FAST = {  # small training budgets; everything else is each method's default
    "llm-streamline": {"steps": 4, "batch_size": 2, "eval_every": 2},
}
IDS = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1))
PROBE = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense") / "ckpt"
    save_pruned(tiny_model("llama", n_layers=4, seed=3), None, None, d)
    return d


def _prune(dense_dir, out, placement, name, settings, ratio=0.3):
    meth = get_method(name)
    st = meth.parse_settings(settings)
    m, _ = open_model(dense_dir, placement=placement, device="cpu", dtype="float32")
    a = adapter_for(m)
    if meth.coupled:
        plan = meth.prune(m, a, IDS, ratio, st, device="cpu")
    else:
        needs = set(meth.needs) | {"norms"}
        stats = capture_stats(m, a, IDS, requests=needs, batch_size=4)
        plan = meth.select(m, a, meth.score(m, a, stats, st), ratio, st)
    if placement == "disk":  # nothing but the embeddings / norm / head stays in memory between steps
        assert all(not is_resident(layer) for layer in a.layers(m))
    save_streaming(m, None, plan, out, shard_bytes=40_000)
    return plan


def _logits(path, placement="device"):
    m, _ = open_model(path, placement=placement, device="cpu", dtype="float32")
    with torch.no_grad():
        return m(input_ids=PROBE, use_cache=False).logits


CASES = [(m.name, FAST.get(m.name, {})) for m in list_methods()]
CASES += [("llm-streamline", {**FAST["llm-streamline"], "replacement": "ffn"}),
          ("llm-streamline", {**FAST["llm-streamline"], "replacement": "collapse"}),
          ("llm-streamline", {**FAST["llm-streamline"], "replacement": "none"}),
          ("slimgpt", {"schedule": "log_increase"}),
          ("slimgpt", {"hessian_inputs": "dense", "gqa": "kv_group"}),
          # every FLAP structure (al_am used to crash under disk: its layers were pruned after release)
          ("flap", {"structure": "al_am"}),
          ("flap", {"structure": "al_am", "bias_compensation": False}),
          ("flap", {"structure": "al_am", "servable": "vllm"}),
          ("flap", {"gqa": "per_group", "metric": "wifn"}),
          ("flap", {"bias_compensation": False}),
          ("llm-rank", {"pipeline": "isolated", "allocation": "global"}),
          # search.drop_blocks: an FFN-free layer at 30 % (min_ffn 64 leaves no cheaper width)
          ("slimgpt", {"schedule": "search", "search": {"drop_blocks": True, "min_ffn": 64}})]


@pytest.mark.parametrize("name,settings", CASES, ids=[f"{n}-{'-'.join(map(str, s.values()))}" for n, s in CASES])
def test_placements_give_identical_logits(dense_dir, tmp_path, name, settings):
    outs, plans = {}, {}
    for pl in PLACEMENTS:
        plans[pl] = _prune(dense_dir, tmp_path / pl, pl, name, settings)
        outs[pl] = _logits(tmp_path / pl)
    for pl in PLACEMENTS[1:]:
        same = ("layers", "params_before", "params_after", "per_layer_ratio")
        assert {k: plans[pl].to_dict().get(k) for k in same} == {k: plans["device"].to_dict().get(k) for k in same}
        assert torch.equal(outs[pl], outs["device"]), (pl, (outs[pl] - outs["device"]).abs().max())
    # the pruned checkpoint itself, opened under each placement (non-uniform ones through the same loader)
    for pl in PLACEMENTS[1:]:
        assert torch.equal(_logits(tmp_path / "device", pl), outs["device"]), pl
    # and it really is pruned
    cfg = json.loads((tmp_path / "device" / "config.json").read_text())
    dense_cfg = json.loads((dense_dir / "config.json").read_text())
    assert (cfg != dense_cfg) or plans["device"].params_after < plans["device"].params_before


def test_sharded_save_has_the_hf_index_and_loads_with_stock_from_pretrained(dense_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    _prune(dense_dir, tmp_path / "out", "disk", "wanda", {"gqa": "per_group"})
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = {f.name for f in (tmp_path / "out").glob("model-*-of-*.safetensors")}
    assert set(index["weight_map"].values()) == files and len(files) > 2
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = stock(input_ids=PROBE, use_cache=False).logits
    assert torch.equal(ref, _logits(tmp_path / "out"))


def test_non_uniform_round_trip_under_every_placement(dense_dir, tmp_path):
    # SlimGPT's log-increasing schedule gives every layer its own width: the config lists them
    _prune(dense_dir, tmp_path / "nu", "disk", "slimgpt", {"schedule": "log_increase"})
    cfg = json.loads((tmp_path / "nu" / "config.json").read_text())
    assert len({(d["n_heads"], d["ffn"]) for d in cfg["pruneflow_layers"]}) > 1
    ref = _logits(tmp_path / "nu")
    m, _ = load_pruned(tmp_path / "nu")
    save_pruned(m, None, None, tmp_path / "again")  # save -> load keeps the logits exactly
    for pl in PLACEMENTS:
        assert torch.equal(_logits(tmp_path / "again", pl), ref), pl


@pytest.mark.parametrize("where", ["offload", "disk"])
def test_streaming_save_of_whole_blocks_equals_surgery_on_device(tmp_path, where):
    """An attention-free layer (its FFN becomes the layer), an FFN-free one and a removed one, written
    layer by layer from a model under `offload` / `disk`: the same checkpoint as surgery in memory."""
    from tests.serve_kinds import plans, tiny_llama

    plan = plans()["whole_blocks"]
    save_pruned(tiny_llama(5), None, None, tmp_path / "dense")
    m, _ = open_model(tmp_path / "dense", placement=where, device="cpu", dtype="float32")
    save_streaming(m, None, plan, tmp_path / "streamed", shard_bytes=40_000)
    dev, _ = open_model(tmp_path / "dense", placement="device", device="cpu", dtype="float32")
    save_pruned(apply_plan(dev, plan), None, plan, tmp_path / "surgery")
    cfg = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert [(d["kind"], d["ffn"]) for d in cfg["pruneflow_layers"]] == [("decoder", 192), ("ffn", 160), ("decoder", 0)]
    assert torch.equal(_logits(tmp_path / "streamed"), _logits(tmp_path / "surgery"))


def test_disk_layers_hold_no_data_outside_their_forward(dense_dir):
    m, _ = open_model(dense_dir, placement="disk", device="cpu", dtype="float32")
    layers = adapter_for(m).layers(m)
    assert all(home_of(layer).mode == "disk" and not is_resident(layer) for layer in layers)
    seen = []
    hook = layers[2].mlp.register_forward_hook(lambda mod, a, o: seen.append(is_resident(layers[2])))
    ppl_disk = perplexity(m, PROBE.reshape(-1), seq_len=12)
    hook.remove()
    assert seen and all(seen) and not is_resident(layers[2])
    dense, _ = open_model(dense_dir, placement="device", device="cpu", dtype="float32")
    assert ppl_disk == perplexity(dense, PROBE.reshape(-1), seq_len=12)


def test_auto_placement_rules():
    gib = 2**30
    sizes = {"total": 16 * gib, "layers": 15 * gib, "layer_max": gib // 2, "other": gib}
    cuda = torch.device("cuda")
    assert choose_placement("auto", sizes, gib, cuda, free=(80 * gib, 100 * gib))[0] == "device"
    assert choose_placement("auto", sizes, gib, cuda, free=(10 * gib, 100 * gib))[0] == "offload"
    assert choose_placement("auto", sizes, gib, cuda, free=(10 * gib, 8 * gib))[0] == "disk"
    # the device check of offload: the rest + one layer + working set (2.5 GiB) must fit the device too
    place, why = choose_placement("auto", sizes, gib, cuda, free=(2 * gib, 100 * gib))
    assert place == "disk" and "one layer" in why
    cpu = torch.device("cpu")
    assert choose_placement("auto", sizes, gib, cpu, free=(8 * gib, 8 * gib))[0] == "disk"
    assert choose_placement("offload", sizes, gib, cpu, free=(8 * gib, 8 * gib)) == ("offload", "requested")


def test_dtype_auto_is_fp32_on_cpu_and_the_checkpoints_own_on_cuda(dense_dir):
    from transformers import AutoConfig

    from pruning_core.loading import resolve_dtype

    cfg = AutoConfig.from_pretrained(dense_dir)
    cfg.dtype = "bfloat16"
    assert resolve_dtype("auto", cfg, torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", cfg, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", cfg, torch.device("cpu")) == torch.float16
    m, _ = open_model(dense_dir, placement="disk", dtype="bfloat16")
    with torch.no_grad():
        out = m(input_ids=PROBE, use_cache=False).logits
    assert out.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in m.parameters())


def test_one_resolve_dtype():
    """The package's `resolve_dtype` is the loader's: names, torch dtypes, auto (fp32 without a config)."""
    import pruning_core
    from pruning_core.errors import ConfigError
    from pruning_core.loading import resolve_dtype

    assert pruning_core.resolve_dtype is resolve_dtype
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype(torch.float16) == torch.float16
    assert resolve_dtype("auto") == torch.float32 and resolve_dtype(None, None, "cuda") == torch.float32
    with pytest.raises(ConfigError, match="model.dtype"):
        resolve_dtype("int3")


def test_own_safetensors_writer_round_trips_every_dtype(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from pruning_core.weightfiles import write_safetensors

    ts = {"a.f32": torch.randn(3, 5), "b.bf16": torch.randn(7).to(torch.bfloat16), "c.i64": torch.arange(4),
          "d.f16": torch.randn(2, 2, 2).half(), "e.empty": torch.zeros(0, 3), "f.bool": torch.tensor([True, False])}
    write_safetensors(tmp_path / "x.safetensors", ts, {"format": "pt"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(ts) and all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in ts.items())
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
