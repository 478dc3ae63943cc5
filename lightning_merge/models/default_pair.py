"""The default pair of source models: two seeds, two disjoint Fashion-MNIST tasks, cached on disk.

``python -m lightning_merge.models.default_pair`` trains them into ``artifacts/sources/`` unless they are
already there and prints each model's test accuracy on its own task.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lightning_merge.data.datamodule import DEFAULT_ROOT, TaskSplitDataModule
from lightning_merge.models.classifier import SourceClassifier
from lightning_merge.models.plateau import PlateauRule
from lightning_merge.models.training import cache_path, source_key, task_accuracy, train_source

DEFAULT_CACHE_DIR = "artifacts/sources"


@dataclass(frozen=True)
class SourceSpec:
    """How one default source model is trained (all of it goes into the cache key)."""

    classes: tuple[int, ...]
    seed: int
    arch: str = "resnet20"
    width: float = 1
    max_epochs: int = 1
    precision: str | None = None
    #: train until validation accuracy plateaus (``max_epochs`` is then the cap); None: fixed epochs
    plateau: PlateauRule | None = None
    model_kwargs: dict = field(default_factory=lambda: {"head": "embedding", "lr": 0.1})


DEFAULT_PAIR: tuple[SourceSpec, ...] = (
    SourceSpec(classes=(0, 1, 2, 3, 4), seed=0),
    SourceSpec(classes=(5, 6, 7, 8, 9), seed=1),
)

#: Per-architecture training settings that differ from ``SourceSpec``'s defaults (SGD, one epoch). A ViT
#: trained from scratch wants AdamW with warmup + cosine and several epochs (about 2–3 min each on one
#: CPU core for 25k images).
ARCH_TRAINING: dict[str, dict] = {
    "vit": {
        "max_epochs": 3,
        "model_kwargs": {
            "head": "embedding",
            "optimizer": "adamw",
            "lr": 2e-3,
            "weight_decay": 0.05,
            "warmup_fraction": 0.1,
        },
    },
}


def arch_spec(classes: tuple[int, ...], seed: int, arch: str, width: float, **kwargs: object) -> SourceSpec:
    """A source spec with ``arch``'s training settings (``ARCH_TRAINING``, else the default pair's)."""
    settings = {**ARCH_TRAINING.get(arch, {}), **kwargs}
    return SourceSpec(classes=tuple(classes), seed=seed, arch=arch, width=width, **settings)


def train_spec(
    spec: SourceSpec, cache_dir: str | Path, root: str, progress_bar: bool = False
) -> SourceClassifier:
    """Train (or load from ``cache_dir``) one source exactly as its spec says."""
    return train_source(
        spec.arch,
        list(spec.classes),
        spec.seed,
        width=spec.width,
        max_epochs=spec.max_epochs,
        precision=spec.precision,
        plateau=spec.plateau,
        cache_dir=cache_dir,
        root=root,
        progress_bar=progress_bar,
        **spec.model_kwargs,
    )


def checkpoint_of(spec: SourceSpec, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """Where ``spec``'s checkpoint lives in ``cache_dir`` (it may not exist yet)."""
    key = source_key(
        spec.arch,
        spec.classes,
        spec.seed,
        width=spec.width,
        max_epochs=spec.max_epochs,
        precision=spec.precision,
        plateau=spec.plateau,
        **spec.model_kwargs,
    )
    return cache_path(cache_dir, key)


def default_pair(
    cache_dir: str | Path = DEFAULT_CACHE_DIR, root: str = DEFAULT_ROOT, progress_bar: bool = False
) -> list[SourceClassifier]:
    """The default source models (trained on first use, then loaded from ``cache_dir``)."""
    return [train_spec(spec, cache_dir, root, progress_bar) for spec in DEFAULT_PAIR]


def main(argv: list[str] | None = None) -> list[dict]:
    """Train (or load) the default pair and print a table of test accuracies and times."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where the checkpoints live")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="folder with the Fashion-MNIST IDX files")
    args = parser.parse_args(argv)
    console = Console()
    data = TaskSplitDataModule(root=args.root, tasks=[list(s.classes) for s in DEFAULT_PAIR])
    rows = []
    for i, spec in enumerate(DEFAULT_PAIR):
        path = checkpoint_of(spec, args.cache_dir)
        action = "loading" if path.is_file() else "training"
        console.print(
            f"{action} source {i}: {spec.arch}×{spec.width}, classes {list(spec.classes)}, seed {spec.seed}"
        )
        start = time.perf_counter()
        model = train_spec(spec, args.cache_dir, args.root, progress_bar=console.is_terminal)
        seconds = time.perf_counter() - start
        accuracy = task_accuracy(model, data.task_test_dataloader(i))
        rows.append({**asdict(spec), "test_acc": accuracy, "seconds": seconds, "checkpoint": str(path)})
    table = Table(title="default source pair: Fashion-MNIST test accuracy on each model's own task")
    for column in ("model", "classes", "seed", "test acc", "train/load s", "checkpoint"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            f"{row['arch']}×{row['width']}",
            str(list(row["classes"])),
            str(row["seed"]),
            f"{100 * row['test_acc']:.2f}%",
            f"{row['seconds']:.1f}",
            row["checkpoint"],
        )
    console.print(table)
    Path(args.cache_dir, "summary.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
