"""Merge an MNIST model and a Fashion-MNIST model into one 20-class model (ZipIt!'s multi-data-set setting).

    bash scripts/setup.sh                              # once: MNIST's IDX files into .cache/mnist
    .venv/bin/python examples/merge_mnist_fmnist.py

Measured 2026-12-02 on 2 CPU cores shared under a load average of about 10: 20 min in all (training
7.6 and 9.7 min, loading, merging and scoring under 3 min); a rerun with the cached models only merges.

Both models are MLPs with their own 10-logit linear head, trained with the project's ``train_source``
(cached under ``--cache-dir``, so a second run only merges). Each data set is its own task with its own
label space: digits are global classes 0-9, clothes 10-19. A linear head over digits cannot be averaged
with one over clothes, so ZipIt! merges everything up to the heads' input (``stop_at=1.0``) and the
merged model keeps both heads. This is ``configs/merge/zipit_mnist_fmnist_mlp.yaml`` in Python.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl

from lightning_merge.data import DatasetTasks, MergeDataModule, TaskData, TaskSplitDataModule
from lightning_merge.methods.zipit import ZipItMerge
from lightning_merge.models import SourceClassifier, train_source
from lightning_merge.module import MergeModule

DIGITS, CLOTHES = list(range(10)), list(range(10, 20))
TRAINING = {"arch": "mlp", "head": "linear", "lr": 0.05, "weight_decay": 5e-4, "schedule": "onecycle"}


def train(dataset: str, seed: int, cache_dir: str) -> SourceClassifier:
    """One MLP on all ten classes of ``dataset`` (its own labels 0-9), one epoch."""
    return train_source(classes=range(10), seed=seed, dataset=dataset, cache_dir=cache_dir, **TRAINING)


def task(name: str, dataset: str, classes: list[int]) -> TaskData:
    """A data set as one task: its test split evaluates, its training split feeds calibration."""
    data = TaskSplitDataModule(dataset=dataset, tasks=[list(range(10))], task=0, eval_batch_size=500)
    return TaskData(classes=classes, datamodule=data, name=name)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache-dir", default="artifacts/mnist_fmnist/sources")
    parser.add_argument("--calibration-size", type=int, default=2000)
    args = parser.parse_args()

    sources = [train("mnist", 0, args.cache_dir), train("fashion_mnist", 1, args.cache_dir)]
    tasks = DatasetTasks(
        [task("mnist", "mnist", DIGITS), task("fashion_mnist", "fashion_mnist", CLOTHES)],
        calibration_size=args.calibration_size,
    )
    # the plain networks: a module without a label-space record takes task i's global classes
    merge = MergeModule(
        sources=[s.model for s in sources],
        method=ZipItMerge(alpha=0.3, beta=0.125, stop_at=1.0),
        heatmaps=0,
    )
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.validate(merge, datamodule=MergeDataModule(tasks), verbose=False)

    print(f"{'model':<28} {'joint (20 classes)':>19} {'MNIST':>7} {'Fashion-MNIST':>14}")
    for key, label in [
        ("merged", "merged (ZipIt!, two heads)"),
        ("ensemble", "ensemble (both models)"),
        ("source0", "MNIST model alone"),
        ("source1", "Fashion-MNIST model alone"),
    ]:
        acc = [merge.results.get(f"{key}/{m}") for m in ("joint_acc", "task0_acc", "task1_acc")]
        cells = ["—" if a is None else f"{100 * a:.2f}" for a in acc]
        print(f"{label:<28} {cells[0]:>19} {cells[1]:>7} {cells[2]:>14}")


if __name__ == "__main__":
    main()
