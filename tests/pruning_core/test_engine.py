"""The layer engine: every decoder layer is brought in exactly once per pass — for every registered
method's prune step (capture, scoring, coupled pruning) and for perplexity, under `offload` and
`disk`, and for the streaming save (kept layers once, removed ones never unless a replacement is built
from them) — and one pass serves several consumers."""

from __future__ import annotations

import collections

import pytest
import torch

from pruning_core import adapter_for, capture_stats, engine, residency, tiny_model, weightfiles
from pruning_core.checkpoint import save_pruned, save_streaming
from pruning_core.loading import open_model
from pruning_core.methods import get_method, list_methods
from pruning_core.metrics import perplexity
from pruning_core.residency import is_resident

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 128, (6, 16), generator=torch.Generator().manual_seed(1))
N_LAYERS = 4


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense") / "ckpt"
    save_pruned(tiny_model("llama", n_layers=N_LAYERS, seed=3), None, None, d)
    return d


@pytest.fixture
def loads(monkeypatch):
    """Every real load of a decoder layer: the engine's (pass, layer) log, the loads that went around
    the engine (the placement's own forward hooks / `bring` on a layer nobody held), and the reads of
    each layer's tensors from its files (disk)."""
    log = {"engine": [], "outside": 0, "outside_layers": collections.Counter(), "reads": collections.Counter()}
    monkeypatch.setattr(engine, "LOADS", log["engine"])
    real_bring = residency._bring

    def counting_bring(layer, h, device, track_changes):
        if h.held == 0:
            log["outside"] += 1
            log["outside_layers"][int(h.prefix.split(".")[-2])] += 1
        return real_bring(layer, h, device, track_changes)

    monkeypatch.setattr(residency, "_bring", counting_bring)
    real_read = weightfiles.TensorFiles.read

    def counting_read(self, names):
        for p in {".".join(n.split(".")[:3]) for n in names if ".layers." in n}:
            log["reads"][p] += 1
        return real_read(self, names)

    monkeypatch.setattr(weightfiles.TensorFiles, "read", counting_read)
    return log


def _once_per_pass(log) -> int:
    """Assert each pass loaded every layer exactly once; return the number of passes."""
    per_pass = collections.defaultdict(list)
    for p, i in log["engine"]:
        per_pass[p].append(i)
    for p, idx in per_pass.items():
        assert sorted(idx) == list(range(N_LAYERS)), (p, idx)
    assert log["outside"] == 0, f"{log['outside']} loads went around the engine"
    return len(per_pass)


CASES = [(m.name, {"steps": 2, "batch_size": 2} if m.name == "llm-streamline" else {}) for m in list_methods()]
CASES += [("flap", {"structure": "al_am"}), ("slimgpt", {"hessian_inputs": "dense"})]


@pytest.mark.parametrize("where", ["offload", "disk"])
@pytest.mark.parametrize("name,settings", CASES, ids=[f"{n}-{'-'.join(map(str, s.values()))}" for n, s in CASES])
def test_every_method_brings_each_layer_once_per_pass(dense_dir, loads, where, name, settings):
    m, _ = open_model(dense_dir, placement=where, device="cpu", dtype="float32")
    a = adapter_for(m)
    meth = get_method(name)
    st = meth.parse_settings(settings)
    loads["reads"].clear()
    if meth.coupled:
        meth.prune(m, a, IDS, 0.3, st, device="cpu")
    else:
        stats = capture_stats(m, a, IDS, requests=set(meth.needs) | {"norms"}, batch_size=2)
        meth.select(m, a, meth.score(m, a, stats, st), 0.3, st)
    passes = _once_per_pass(loads)
    assert passes >= (0 if meth.coupled else 1)
    if where == "disk":  # and nothing read a layer's file outside the engine's loads
        assert all(not is_resident(layer) for layer in a.layers(m))
        assert set(loads["reads"].values()) <= {passes}, loads["reads"]


@pytest.mark.parametrize("where", ["offload", "disk"])
def test_perplexity_reads_each_layer_once_not_once_per_batch(dense_dir, loads, where):
    ids = torch.randint(0, 128, (8 * 12,), generator=torch.Generator().manual_seed(5))
    m, _ = open_model(dense_dir, placement=where, device="cpu", dtype="float32")
    loads["reads"].clear()
    got = perplexity(m, ids, seq_len=12, batch_size=2)  # 8 windows, 4 batches
    assert _once_per_pass(loads) == 1
    if where == "disk":
        assert dict(loads["reads"]) == {f"model.layers.{i}": 1 for i in range(N_LAYERS)}
    dense, _ = open_model(dense_dir, placement="device", device="cpu", dtype="float32")
    assert got == perplexity(dense, ids, seq_len=12, batch_size=2)  # the same numbers, exactly


def test_one_pass_serves_several_consumers(dense_dir, loads):
    """Capture's statistics and a weights consumer in one pass: one load per layer, the same
    statistics as capture on its own."""
    from pruning_core.capture import Accumulator, StatsConsumer

    m, _ = open_model(dense_dir, placement="disk", device="cpu", dtype="float32")
    a = adapter_for(m)
    alone = capture_stats(m, a, IDS, requests={"cosine"}, batch_size=2)
    loads["engine"].clear()
    stats = StatsConsumer(a, Accumulator(), frozenset({"cosine"}), N_LAYERS, IDS.numel())

    class Norms:
        def __init__(self):
            self.norms = {}

        def after(self, step):
            self.norms[step.index] = float(a.proj(step.layer, a.o).weight.norm())
            return False

    norms = Norms()
    engine.run_pass(m, a, [stats, norms], IDS, batch_size=2)
    assert _once_per_pass(loads) == 1
    both = stats.result()
    assert both.keys() == alone.keys() and all(torch.equal(both[k], alone[k]) for k in alone)
    assert sorted(norms.norms) == list(range(N_LAYERS)) and all(v > 0 for v in norms.norms.values())


def test_a_changed_layer_is_written_back_an_unchanged_one_is_not(dense_dir, monkeypatch):
    m, _ = open_model(dense_dir, placement="disk", device="cpu", dtype="float32")
    a = adapter_for(m)
    spilled = []
    real = weightfiles.TensorFiles.spill
    monkeypatch.setattr(weightfiles.TensorFiles, "spill", lambda self, t: (spilled.append(sorted(t)), real(self, t)))

    class ZeroLayer2:
        def begin(self, step):
            if step.index == 2:
                a.proj(step.layer, a.o).weight.data.zero_()

        def after(self, step):
            return step.index == 2

    engine.run_pass(m, a, [ZeroLayer2()])
    assert len(spilled) == 1 and all(k.startswith("model.layers.2.") for k in spilled[0])
    seen = {}
    engine.visit_layers(m, a, lambda i, layer: seen.__setitem__(i, float(a.proj(layer, a.o).weight.abs().sum())))
    assert seen[2] == 0 and all(seen[i] > 0 for i in (0, 1, 3))


SAVE_CASES = [("wanda", {}), ("slimgpt", {}), ("flap", {"structure": "al_am"}), ("shortgpt", {})] + [
    ("llm-streamline", {"steps": 2, "batch_size": 2, "replacement": r}) for r in ("layer", "ffn", "collapse", "none")]


@pytest.mark.parametrize("where", ["offload", "disk"])
@pytest.mark.parametrize("name,settings", SAVE_CASES, ids=[f"{n}-{'-'.join(map(str, s.values()))}" for n, s in SAVE_CASES])
def test_streaming_save_brings_each_kept_layer_once_and_skips_removed_ones(dense_dir, tmp_path, loads, where, name,
                                                                           settings):
    m, _ = open_model(dense_dir, placement=where, device="cpu", dtype="float32")
    a = adapter_for(m)
    meth = get_method(name)
    st = meth.parse_settings(settings)
    if meth.coupled:
        plan = meth.prune(m, a, IDS, 0.3, st, device="cpu")
    else:
        stats = capture_stats(m, a, IDS, requests=set(meth.needs) | {"norms"}, batch_size=2)
        plan = meth.select(m, a, meth.score(m, a, stats, st), 0.3, st)
    loads["engine"].clear()
    loads["outside_layers"].clear()
    save_streaming(m, None, plan, tmp_path / "out")
    per_layer = collections.Counter(i for _p, i in loads["engine"]) + loads["outside_layers"]
    kept = [i for i, lp in enumerate(plan.layers) if lp.keep]
    span = set()
    for lp in plan.layers:
        if lp.replacement and lp.replacement.get("kind") not in (None, "layer") and "span" in lp.replacement:
            span |= set(range(*lp.replacement["span"]))
    assert {i for i in per_layer} == set(kept) | span, (per_layer, kept, span)
    assert set(per_layer.values()) == {1}, per_layer  # a removed layer is read only to build a replacement
    assert len(kept) < N_LAYERS or name not in ("shortgpt", "llm-streamline")


@pytest.mark.parametrize("family,overrides", [
    ("llama", {}), ("opt", {}), ("mistral", {}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}),
], ids=["llama", "opt", "mistral", "qwen2-sliding"])
@pytest.mark.parametrize("where", ["offload", "disk"])
def test_layer_major_perplexity_equals_whole_model_forwards_for_every_family(tmp_path, family, overrides, where):
    """Layer-major (each layer's own caught kwargs: a sliding-window layer gets its sliding mask; the
    model's own final norm / projection after the last layer) gives the same numbers, exactly."""
    d = tmp_path / family
    save_pruned(tiny_model(family, n_layers=4, seed=7, **overrides), None, None, d)
    ids = torch.randint(0, 128, (6 * 16,), generator=torch.Generator().manual_seed(8))
    ref, _ = open_model(d, placement="device", device="cpu", dtype="float32")
    m, _ = open_model(d, placement=where, device="cpu", dtype="float32")
    assert perplexity(m, ids, seq_len=16, batch_size=4) == perplexity(ref, ids, seq_len=16, batch_size=4)
