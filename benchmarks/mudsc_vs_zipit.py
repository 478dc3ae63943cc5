"""MuDSC vs ZipIt! on one trained pair: how often their matchings differ, and the merged accuracies.

    python benchmarks/mudsc_vs_zipit.py --sources artifacts/sources/default_task0.ckpt \
        artifacts/sources/default_task1.ckpt

A source feature's matching "differs" when the set of source features merged with it differs
between the two matchings; the fraction is over all N·n features of every merge point. Every merge
gets its BatchNorm statistics reset on the calibration images, then joint accuracy (argmax over all
classes) and per-task accuracy (argmax over the task's classes, on the task's images) on the test
images (``--test-images`` seeded ones). The λ search scores each candidate as the paper does, by
accuracy on training images: joint accuracy on ``--search-images`` seeded training images after a
BatchNorm reset on ``--search-reset`` calibration images (small defaults: a 1-core CPU budget).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_merge.apply.batchnorm_reset import reset_batchnorm
from lightning_merge.data import TaskSplitDataModule
from lightning_merge.graph import trace_graph
from lightning_merge.match.transform import SpaceTransform
from lightning_merge.methods import MuDSCMerge, ZipItMerge
from lightning_merge.models.training import load_source
from lightning_merge.stats.collect import collect_statistics


def partners(t: SpaceTransform) -> list[frozenset[int]]:
    """For every source feature, the source features merged with it (itself included)."""
    owner = t.unmerge.argmax(1)
    groups = [frozenset(torch.nonzero(owner == j).flatten().tolist()) for j in range(t.width)]
    return [groups[int(j)] for j in owner]


def differing(a: dict[str, SpaceTransform], b: dict[str, SpaceTransform]) -> tuple[int, int]:
    diff = total = 0
    for name in a:
        pa, pb = partners(a[name]), partners(b[name])
        diff += sum(x != y for x, y in zip(pa, pb, strict=True))
        total += len(pa)
    return diff, total


@torch.no_grad()
def accuracies(model: nn.Module, data: TaskSplitDataModule, loader: DataLoader) -> dict[str, float]:
    """Joint accuracy, and per task the accuracy over its classes on its images, in one pass."""
    logits, labels = [], []
    for x, y in loader:
        logits.append(model(x))
        labels.append(y)
    out_all, y_all = torch.cat(logits), torch.cat(labels)
    out = {"joint": float((out_all.argmax(-1) == y_all).float().mean())}
    for t in range(data.num_tasks):
        classes = torch.tensor(data.classes_of(t))
        mine = torch.isin(y_all, classes)
        pred = classes[out_all[mine][:, classes].argmax(-1)]
        out[f"task{t}"] = float((pred == y_all[mine]).float().mean())
    out["task_avg"] = sum(out[f"task{t}"] for t in range(data.num_tasks)) / data.num_tasks
    return out


@torch.no_grad()
def joint(model: nn.Module, loader: DataLoader) -> float:
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    return correct / total


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sources", nargs=2, required=True)
    parser.add_argument("--root", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--calibration", type=int, default=2000)
    parser.add_argument("--search-images", type=int, default=1000, help="training images scoring λ")
    parser.add_argument("--search-reset", type=int, default=500, help="calibration images for its BN reset")
    parser.add_argument("--test-images", type=int, default=2000, help="seeded test images evaluated")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = TaskSplitDataModule(root=args.root, calibration_size=args.calibration)
    data.setup()
    models = [load_source(p).model.eval() for p in args.sources]
    cal = DataLoader(data.calibration_dataset(), batch_size=500)
    train = data.dataset_for("train", None)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[: args.search_images]
    search = DataLoader(Subset(train, pick.tolist()), batch_size=1000)
    search_cal = DataLoader(Subset(data.calibration_dataset(), range(args.search_reset)), batch_size=500)
    test_all = data.dataset_for("test", None)
    pick = torch.randperm(len(test_all), generator=torch.Generator().manual_seed(2))[: args.test_images]
    test = DataLoader(Subset(test_all, pick.tolist()), batch_size=1000)
    graph = trace_graph(models[0], next(iter(cal))[0][:2])
    stats = collect_statistics(models, graph, cal, progress=False)

    def score(model: nn.Module) -> float:
        return joint(reset_batchnorm(model, search_cal).eval(), search)

    runs = {
        "zipit (a=0.3, b=0.125)": (ZipItMerge, {}),
        "zipit (a=0.5, b=1)": (ZipItMerge, {"alpha": 0.5, "beta": 1.0}),
        "mudsc lam=0.5": (MuDSCMerge, {}),
        "mudsc lam search": (MuDSCMerge, {"lam_search": True, "score": score}),
    }
    transforms, rows = {}, []
    for label, (cls, kwargs) in runs.items():
        method = cls(**kwargs)
        start = time.perf_counter()
        result = method.merge(models, graph=graph, stats=stats)
        seconds = time.perf_counter() - start
        transforms[label] = result.transforms
        acc = accuracies(reset_batchnorm(result.model, cal).eval(), data, test)
        extra = ""
        if "lam" in result.diagnostics:
            extra = f"selected lam {result.diagnostics['lam']}, train acc {result.diagnostics['lam_scores']}"
        rows.append((label, acc, seconds, extra))
    for label, acc, seconds, extra in rows:
        print(
            f"{label:24s} joint {acc['joint']:.4f} task0 {acc['task0']:.4f} task1 {acc['task1']:.4f} "
            f"avg {acc['task_avg']:.4f}  ({seconds:.1f} s) {extra}"
        )
    for ref in ("zipit (a=0.3, b=0.125)", "zipit (a=0.5, b=1)"):
        for label in ("mudsc lam=0.5", "mudsc lam search"):
            d, n = differing(transforms[label], transforms[ref])
            print(f"{label} vs {ref}: {d}/{n} = {d / n:.3f} of features matched differently")


if __name__ == "__main__":
    main()
