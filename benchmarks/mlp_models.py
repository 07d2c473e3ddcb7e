"""The benchmark models of MLP-Rank: plain multilayer perceptrons, their hidden neurons scored and
removed physically (`bench_mlp_digits.py`; not part of `pruning_core`, whose subjects are LLMs).

Paper: Hoffmann et al., "LLM-Rank" (arXiv 2410.13299), whose MLP experiments come from the
MLP-Rank thesis code (github.com/amazon-science/mlp-rank-pruning). The scorer is the weighted
PageRank of `pruning_core.methods.llm_rank` (one sweep over the Linear layers in execution order).

A network is an `nn.Sequential` of `nn.Linear`, element-wise activations (ReLU, GELU, SiLU, Tanh,
Sigmoid), `nn.BatchNorm1d`, `nn.LayerNorm`, `nn.Dropout`, `nn.Flatten` and `Residual(body)` blocks
(`x + body(x)`, as in the paper's 6/12-layer nets).

Neurons and groups. Walking the network, every Linear opens a new *group* of nodes (its output
features) and closes the previous one as its consumer (input columns); BatchNorm/LayerNorm attach
to the current group. A residual add ties the stream entering the block to the body's output, so
the two groups are merged: their features can only be removed together. The input and the output
group are never pruned; every other group is a unit of pruning. Removing neuron j of a group slices
row j (and bias) of every producing Linear, entry j of every BatchNorm/LayerNorm (BatchNorm running
statistics included) and column j of every consuming Linear.

Scores. Every scorer gives one score per output row of every Linear, normalised per layer (as the
reference code); a group's score is the sum over its producing Linears (a group without a residual
has one producer, so this is exactly the paper's score). The node activation (`node`) is the L2
norm over calibration samples of the value the neuron passes on ("post": after the element-wise
modules following the Linear, i.e. ReLU(BN(Wx)), as the MLP-Rank code) or of the raw Linear output
("pre"). Through a residual add the stream's importance is normalise(p_skip + p_body) (the skip is
an identity link). Methods: `mlprank` (weighted PageRank, gamma 0.9, theta 0.5: MLP-Rank's
defaults), `mpr` (modified PageRank), `random`, `l1` (L1 of the incoming row), `activation`,
`wanda` (sum_j |W_ij| * ||x_j||).

Allocation: "local" removes round(n * ratio) neurons of every group; "global" ranks all groups
together after multiplying each group's scores by its size (so every group's mean is 1: the
per-layer normalisation would otherwise make wide layers look unimportant), keeping >= 1 neuron.

Save / load: `save_mlp` writes one safetensors file whose metadata holds the architecture (a JSON
list of layer descriptions); `load_mlp` rebuilds the network from it. No pickles.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pruning_core.adapters import slice_linear
from pruning_core.capture import Accumulator
from pruning_core.errors import ConfigError, DataError, StorageError
from pruning_core.methods.llm_rank import keep_global, keep_local, mpr_layer, normalise, wpr_layer

METHODS = ("mlprank", "mpr", "random", "l1", "activation", "wanda")
_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


class Residual(nn.Module):
    """x + body(x)."""

    def __init__(self, *body: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*body)

    def forward(self, x):
        return x + self.body(x)


# ------------------------------------------------------------------------------------------------
# architecture description (for save / load)
# ------------------------------------------------------------------------------------------------
def describe(seq: nn.Sequential) -> list[dict]:
    out = []
    for m in seq:
        if isinstance(m, nn.Linear):
            out.append(
                {"type": "linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None}
            )
        elif isinstance(m, nn.BatchNorm1d):
            out.append({"type": "bn", "n": m.num_features, "eps": m.eps, "affine": m.affine})
        elif isinstance(m, nn.LayerNorm):
            out.append(
                {"type": "ln", "n": int(m.normalized_shape[0]), "eps": m.eps, "affine": m.weight is not None}
            )
        elif isinstance(m, nn.Dropout):
            out.append({"type": "dropout", "p": m.p})
        elif isinstance(m, nn.Flatten):
            out.append({"type": "flatten"})
        elif isinstance(m, Residual):
            out.append({"type": "residual", "body": describe(m.body)})
        elif type(m) in _ACTS.values():
            out.append({"type": next(k for k, v in _ACTS.items() if type(m) is v)})
        else:
            raise ConfigError(
                "model",
                type(m).__name__,
                "Linear, BatchNorm1d, LayerNorm, Dropout, Flatten, "
                "Residual or an activation (" + ", ".join(_ACTS) + ")",
            )
    return out


def build(spec: list[dict]) -> nn.Sequential:
    mods: list[nn.Module] = []
    for d in spec:
        t = d["type"]
        if t == "linear":
            mods.append(nn.Linear(d["in"], d["out"], bias=d["bias"]))
        elif t == "bn":
            mods.append(nn.BatchNorm1d(d["n"], eps=d["eps"], affine=d["affine"]))
        elif t == "ln":
            mods.append(nn.LayerNorm(d["n"], eps=d["eps"], elementwise_affine=d["affine"]))
        elif t == "dropout":
            mods.append(nn.Dropout(d["p"]))
        elif t == "flatten":
            mods.append(nn.Flatten())
        elif t == "residual":
            mods.append(Residual(*build(d["body"])))
        elif t in _ACTS:
            mods.append(_ACTS[t]())
        else:
            raise DataError("mlp.spec", t, "linear, bn, ln, dropout, flatten, residual, " + ", ".join(_ACTS))
    return nn.Sequential(*mods)


def save_mlp(model: nn.Sequential, path: str | Path) -> Path:
    """One safetensors file: the state dict, the architecture in the metadata. Atomic."""
    from safetensors.torch import save_file

    path = Path(path)
    spec = describe(model)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            save_file(state, tmp, metadata={"pruneflow_mlp": json.dumps(spec)})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    except OSError as e:
        raise StorageError("output", str(path), "a writable file path", str(e)) from None
    return path


def load_mlp(path: str | Path) -> nn.Sequential:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DataError("model", str(path), "a .safetensors file written by benchmarks.mlp_models.save_mlp")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "pruneflow_mlp" not in meta:
        raise DataError("model", str(path), "a .safetensors file written by benchmarks.mlp_models.save_mlp")
    model = build(json.loads(meta["pruneflow_mlp"]))
    model.load_state_dict(load_file(str(path)))
    return model.eval()


# ------------------------------------------------------------------------------------------------
# the graph: Linear layers in execution order, neuron groups
# ------------------------------------------------------------------------------------------------
@dataclass
class Group:
    size: int
    producers: list[str] = field(default_factory=list)  # Linear names whose output rows are these nodes
    norms: list[str] = field(default_factory=list)  # BatchNorm / LayerNorm over these features
    consumers: list[str] = field(default_factory=list)  # Linear names whose input columns are these nodes
    boundary: bool = False  # the network's input or output: never pruned
    merged_into: Group | None = None

    def root(self) -> Group:
        g = self
        while g.merged_into is not None:
            g = g.merged_into
        return g


@dataclass
class Graph:
    linears: list[str]  # execution order
    post: dict[str, str]  # Linear name -> module whose output is the neuron's "post" activation
    groups: list[Group]  # prunable groups (roots)
    first: str


def _linear_in(mod: nn.Module) -> int | None:
    return mod.in_features if isinstance(mod, nn.Linear) else None


def graph(model: nn.Sequential) -> Graph:
    """Linear layers in execution order and the groups of hidden neurons that can be removed."""
    describe(model)  # validates module types
    first = next((n for n, m in model.named_modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise ConfigError("model", "no nn.Linear", "an nn.Sequential of Linear layers")
    linears, post, all_groups = [], {}, []

    def walk(seq: nn.Sequential, prefix: str, cur: Group | None) -> Group | None:
        mods = list(seq.named_children())
        for k, (name, m) in enumerate(mods):
            full = prefix + name
            if isinstance(m, nn.Linear):
                if cur is None:
                    cur = Group(m.in_features, boundary=True)
                    all_groups.append(cur)
                cur.root().consumers.append(full)
                linears.append(full)
                # "post" activation: output of the last element-wise module right after this Linear
                last = full
                for n2, m2 in mods[k + 1 :]:
                    if isinstance(m2, (nn.Linear, Residual, nn.Flatten)):
                        break
                    last = prefix + n2
                post[full] = last
                cur = Group(m.out_features, producers=[full])
                all_groups.append(cur)
            elif isinstance(m, (nn.BatchNorm1d, nn.LayerNorm)):
                if cur is None:
                    cur = Group(_norm_size(m), boundary=True)
                    all_groups.append(cur)
                cur.root().norms.append(full)
            elif isinstance(m, Residual):
                if cur is None:
                    raise ConfigError("model", full, "a Residual block after the first Linear layer")
                out = walk(m.body, full + ".body.", cur)
                a, b = cur.root(), out.root()
                if a is not b:
                    if a.size != b.size:
                        raise ConfigError(
                            "model", full, "a Residual body whose output size equals its input size"
                        )
                    b.producers += a.producers
                    b.norms += a.norms
                    b.consumers += a.consumers
                    b.boundary = b.boundary or a.boundary
                    a.merged_into = b
                cur = b
            # activations, dropout, flatten: same nodes
        return cur

    last = walk(model, "", None)
    last.root().boundary = True
    roots = []
    for g in all_groups:
        r = g.root()
        if r is g and not g.boundary and g.consumers:
            roots.append(g)
    return Graph(linears, post, roots, first)


def _norm_size(m) -> int:
    return m.num_features if isinstance(m, nn.BatchNorm1d) else int(m.normalized_shape[0])


# ------------------------------------------------------------------------------------------------
# calibration and scoring
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def calibrate(model: nn.Sequential, x: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per Linear `name`: `{name}.in_sq`, `{name}.out_sq` (raw output) and `{name}.post_sq` (after the
    element-wise modules that follow it): sums of squares over the calibration samples, fp64."""
    g = graph(model)
    mods = dict(model.named_modules())
    acc = Accumulator(torch.float64)
    add = acc.vec

    def on_linear(n):
        def hook(_m, a, o):
            add(n + ".in_sq", a[0])
            add(n + ".out_sq", o)

        return hook

    def on_post(n):
        def hook(_m, _a, o):
            add(n + ".post_sq", o)

        return hook

    handles = []
    for name in g.linears:
        handles.append(mods[name].register_forward_hook(on_linear(name)))
        handles.append(mods[g.post[name]].register_forward_hook(on_post(name)))
    was = model.training
    model.eval()
    try:
        for b in range(0, x.shape[0], batch_size):
            model(x[b : b + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return acc.data


def layer_scores(
    model: nn.Sequential,
    stats: dict[str, torch.Tensor],
    method: str = "mlprank",
    gamma: float = 0.9,
    theta: float = 0.5,
    node: str = "post",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """One score per output row of every Linear (normalised per layer), by execution order."""
    if method not in METHODS:
        raise ConfigError("method", method, ", ".join(METHODS))
    if node not in ("post", "pre"):
        raise ConfigError("node", node, "post or pre")
    for name, v in (("gamma", gamma), ("theta", theta)):
        if not 0.0 <= float(v) <= 1.0:
            raise ConfigError(name, v, "a number in [0, 1]")
    g = graph(model)
    mods = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)

    def norm(key):
        if key not in stats:
            raise DataError("stats", key, "statistics from benchmarks.mlp_models.calibrate on this model")
        return stats[key].to(torch.float64).clamp_min(0).sqrt()

    out: dict[str, torch.Tensor] = {}
    if method in ("mlprank", "mpr"):
        node_key = ".post_sq" if node == "post" else ".out_sq"

        def walk(seq, prefix, p):
            for name, m in seq.named_children():
                full = prefix + name
                if isinstance(m, nn.Linear):
                    w = m.weight.detach()
                    a = norm(full + node_key)
                    p = wpr_layer(w, p, a, gamma, theta) if method == "mlprank" else mpr_layer(w, p, a)
                    out[full] = p
                elif isinstance(m, Residual):
                    p = normalise(p + walk(m.body, full + ".body.", p))
            return p

        walk(model, "", normalise(norm(g.first + ".in_sq")))
        return out
    for name in g.linears:
        w = mods[name].weight.detach().to(torch.float64)
        if method == "random":
            s = torch.rand(w.shape[0], generator=gen, dtype=torch.float64)
        elif method == "l1":
            s = w.abs().sum(1)
        elif method == "activation":
            s = norm(name + (".post_sq" if node == "post" else ".out_sq"))
        else:  # wanda
            s = w.abs() @ norm(name + ".in_sq")
        out[name] = normalise(s)
    return out


def group_scores(
    model: nn.Sequential, per_layer: dict[str, torch.Tensor]
) -> list[tuple[Group, torch.Tensor]]:
    """Each prunable group with its score: the sum over its producing Linears' row scores."""
    return [(g, sum(per_layer[p] for p in g.producers)) for g in graph(model).groups]


# ------------------------------------------------------------------------------------------------
# physical removal
# ------------------------------------------------------------------------------------------------
def _slice_norm(m: nn.Module, idx: torch.Tensor) -> nn.Module:
    n = idx.numel()
    if isinstance(m, nn.BatchNorm1d):
        new = nn.BatchNorm1d(
            n, eps=m.eps, momentum=m.momentum, affine=m.affine, track_running_stats=m.track_running_stats
        )
        for k in ("running_mean", "running_var"):
            if getattr(m, k) is not None:
                getattr(new, k).copy_(getattr(m, k).index_select(0, idx))
        if m.num_batches_tracked is not None:
            new.num_batches_tracked.copy_(m.num_batches_tracked)
    else:
        new = nn.LayerNorm(n, eps=m.eps, elementwise_affine=m.weight is not None)
    if m.weight is not None:
        new.weight.data.copy_(m.weight.data.index_select(0, idx))
        if getattr(m, "bias", None) is not None:
            new.bias.data.copy_(m.bias.data.index_select(0, idx))
    return new.to(device=idx.device).train(m.training)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def remove_neurons(model: nn.Sequential, keep: list[tuple[Group, list[int]]]) -> nn.Sequential:
    """A pruned copy: for every (group, kept indices), slice producers' rows, norms and consumers' columns."""
    model = copy.deepcopy(model)
    for g, kept in keep:
        if not kept:
            raise ConfigError("ratio", 1.0, "a ratio that keeps at least one neuron per layer")
        idx = torch.as_tensor(sorted(kept), dtype=torch.long)
        # a Linear inside a residual body can be both producer and consumer of the same group:
        # always slice the live module
        for names, dim in ((g.producers, 0), (g.consumers, 1)):
            for n in names:
                lin = model.get_submodule(n)
                _replace(model, n, slice_linear(lin, idx, dim))
        for n in g.norms:
            mod = model.get_submodule(n)
            dev = next(iter(list(mod.parameters()) + list(mod.buffers())), torch.empty(0)).device
            _replace(model, n, _slice_norm(mod, idx.to(dev)))
    return model


def prune_mlp(
    model: nn.Sequential,
    stats: dict[str, torch.Tensor],
    ratio: float,
    method: str = "mlprank",
    allocation: str = "local",
    **score_kw,
) -> tuple[nn.Sequential, dict]:
    """Score, select and remove: returns (pruned copy, {"kept": [...], "params_before/after"})."""
    if not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) < 1.0:
        raise ConfigError("ratio", ratio, "a number in [0, 1)")
    if allocation not in ("local", "global"):
        raise ConfigError("allocation", allocation, "local or global")
    gs = group_scores(model, layer_scores(model, stats, method=method, **score_kw))
    if allocation == "local":
        keeps = [keep_local(s, ratio) for _, s in gs]
    else:
        keeps = keep_global([s for _, s in gs], ratio)
    pruned = remove_neurons(model, [(g, k) for (g, _), k in zip(gs, keeps)])
    info = {
        "kept": [len(k) for k in keeps],
        "sizes": [g.size for g, _ in gs],
        "params_before": sum(p.numel() for p in model.parameters()),
        "params_after": sum(p.numel() for p in pruned.parameters()),
    }
    return pruned, info
