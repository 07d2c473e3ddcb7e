"""MLP-Rank reproduction offline: small MLPs on scikit-learn's bundled digits, pruned 10-50 %.

The paper (LLM-Rank, arXiv 2410.13299; MLP-Rank thesis) trains 2-, 3-, 6- and 12-layer MLPs on
MNIST / FashionMNIST / CIFAR and reports MLP-Rank +6.09 % mean accuracy retention over random, L1 and
activation pruning. Offline we use the 8x8 digits (1797 images, 64 features, 10 classes) and the
same shapes scaled down (the 6-layer one with BatchNorm and two residual adds), calibrate on the
first 64 training images (as the paper's code), prune hidden neurons with every scorer and report
accuracy retention = pruned / dense test accuracy, averaged over seeds.

    .venv/bin/python benchmarks/bench_mlp_digits.py [--seeds 3] [--allocation local global]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import mlp_models as mlp  # noqa: E402

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
METHODS = ("mlprank", "random", "l1", "activation", "wanda", "mpr")
BASE3 = ("random", "l1", "activation")


def shapes() -> dict:
    def two():
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def three():
        return nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def six():  # 64-128-128-64-64-32-10 (paper: 3072-512-512-256-256-128-10), BatchNorm, 2 residual adds
        return nn.Sequential(
            nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
            mlp.Residual(nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU()),
            nn.Linear(128, 64), nn.BatchNorm1d(64), nn.ReLU(),
            mlp.Residual(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU()),
            nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
            nn.Linear(32, 10),
        )  # fmt: skip

    return {
        "2-layer 64-128-10": two,
        "3-layer 64-128-128-10": three,
        "6-layer res+BN 64-128-128-64-64-32-10": six,
    }


def data(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.3, random_state=seed, stratify=y)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return f(xtr), torch.tensor(ytr), f(xte), torch.tensor(yte)


def train(model: nn.Module, x, y, seed: int, epochs: int = 40) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for b in range(0, x.shape[0], 64):
            i = perm[b : b + 64]
            if i.numel() < 2:
                continue
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--allocation", nargs="+", default=["local", "global"], choices=["local", "global"])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.time()
    # ret[alloc][shape][method][ratio] -> list of retentions
    ret: dict = {a: {} for a in args.allocation}
    dense_acc: dict = {}
    sizes: dict = {}
    for name, make in shapes().items():
        for seed in range(args.seeds):
            xtr, ytr, xte, yte = data(seed)
            torch.manual_seed(seed)
            model = train(make(), xtr, ytr, seed)
            acc0 = accuracy(model, xte, yte)
            dense_acc.setdefault(name, []).append(acc0)
            stats = mlp.calibrate(model, xtr[:64])
            for alloc in args.allocation:
                for meth in METHODS:
                    for r in RATIOS:
                        pruned, info = mlp.prune_mlp(
                            model, stats, r, method=meth, allocation=alloc, seed=seed
                        )
                        a = accuracy(pruned, xte, yte)
                        ret[alloc].setdefault(name, {}).setdefault(meth, {}).setdefault(r, []).append(
                            a / acc0
                        )
                        if seed == 0 and meth == "mlprank" and alloc == args.allocation[0] and r == 0.5:
                            with tempfile.TemporaryDirectory() as d:
                                mlp.save_mlp(pruned, Path(d) / "m.safetensors")
                                again = mlp.load_mlp(Path(d) / "m.safetensors")
                                same = torch.equal(again(xte), pruned(xte))
                            sizes[name] = (info["params_before"], info["params_after"], same)

    def mean(v):
        return sum(v) / len(v)

    print(
        f"## MLP-Rank on digits (sklearn), {args.seeds} seeds, retention = pruned / dense test accuracy (%)\n"
    )
    print("| model | dense acc (%) | params dense | params at 50 % (mlprank, local) | reload identical |")
    print("|---|---|---|---|---|")
    for name in shapes():
        pb, pa, same = sizes[name]
        print(f"| {name} | {100 * mean(dense_acc[name]):.2f} | {pb} | {pa} | {same} |")
    for alloc in args.allocation:
        print(f"\n### allocation: {alloc}\n")
        for name in shapes():
            print(f"\n**{name}**\n")
            print("| method | " + " | ".join(f"{int(r * 100)} %" for r in RATIOS) + " | mean |")
            print("|---|" + "---|" * (len(RATIOS) + 1))
            for meth in METHODS:
                row = [100 * mean(ret[alloc][name][meth][r]) for r in RATIOS]
                print(f"| {meth} | " + " | ".join(f"{v:.2f}" for v in row) + f" | {mean(row):.2f} |")
        print(
            f"\n**Mean gain of MLP-Rank in retention (percentage points), allocation {alloc}** "
            "(over shapes x ratios x seeds; paper: +6.09 over random / L1 / activation)\n"
        )
        print("| over | " + " | ".join(shapes()) + " | all |")
        print("|---|" + "---|" * (len(shapes()) + 1))

        def gain(base, names, alloc=alloc):
            d = [
                a - b
                for n in names
                for r in RATIOS
                for a, b in zip(ret[alloc][n]["mlprank"][r], ret[alloc][n][base][r])
            ]
            return 100 * mean(d)

        for base in METHODS[1:]:
            cells = [gain(base, [n]) for n in shapes()] + [gain(base, list(shapes()))]
            print(f"| {base} | " + " | ".join(f"{v:+.2f}" for v in cells) + " |")
        cells = [mean([gain(b, [n]) for b in BASE3]) for n in shapes()] + [
            mean([gain(b, list(shapes())) for b in BASE3])
        ]
        print("| mean of random, l1, activation | " + " | ".join(f"{v:+.2f}" for v in cells) + " |")
    print(f"\n_{time.time() - t0:.0f} s on CPU (1 thread)._")


if __name__ == "__main__":
    main()
