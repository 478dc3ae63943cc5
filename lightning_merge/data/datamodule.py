"""Disjoint-task splits of (Fashion-)MNIST as a ``LightningDataModule``.

A *task* is a list of global class ids; each source model is trained on one task, and merging is
judged on every task and on all classes jointly. Labels always stay global class ids, so the
outputs of models trained on different tasks can be compared in one label space.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_merge.data.idx import DATASETS, default_root, load_split

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
DEFAULT_TASKS: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))


class TensorImageDataset(Dataset):
    """Normalised float32 images ``[N, C, H, W]`` and int64 global labels, held in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, channels: int = 1) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.channels = channels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.channels != 1:
            image = image.expand(self.channels, -1, -1)
        return image, self.labels[index]


@lru_cache(maxsize=8)
def _cached_split(root: str, train: bool, dataset: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read each IDX split once per process (several data modules share the same tensors)."""
    return load_split(root, train=train, dataset=dataset)


def validate_tasks(tasks: Sequence[Sequence[int]], num_classes: int) -> list[list[int]]:
    """Check that tasks are non-empty, in range and pairwise disjoint; return them as lists."""
    if not isinstance(tasks, Sequence) or isinstance(tasks, str) or len(tasks) == 0:
        raise ValueError(f"tasks must be a non-empty list of class lists, got {tasks!r}")
    owner: dict[int, int] = {}
    checked: list[list[int]] = []
    for t, task in enumerate(tasks):
        if not isinstance(task, Sequence) or isinstance(task, str) or len(task) == 0:
            raise ValueError(f"task {t} must be a non-empty list of class ids, got {task!r}")
        for c in task:
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < num_classes:
                raise ValueError(f"task {t}: class {c!r} is not an integer in [0, {num_classes})")
            if c in owner:
                where = "twice in task" if owner[c] == t else f"in tasks {owner[c]} and"
                raise ValueError(f"class {c} appears {where} {t}; tasks must be disjoint")
            owner[c] = t
        checked.append([int(c) for c in task])
    return checked


class TaskSplitDataModule(pl.LightningDataModule):
    """Per-task train/val/test loaders and a seeded calibration loader over (Fashion-)MNIST.

    ``root`` is the folder of the IDX files; ``None``: the data set's default
    (:func:`~lightning_merge.data.idx.default_root`: Fashion-MNIST's Debian folder, MNIST's ``.cache/mnist``).
    ``task`` selects the classes the standard ``train/val/test_dataloader`` use (``None``: all classes
    of all tasks). The validation set is a seeded hold-out of ``val_size`` training images; the
    calibration set is ``calibration_size`` images drawn (seeded) from the remaining training images
    of all tasks' classes, for the statistics pass of a merge.
    """

    def __init__(
        self,
        root: str | None = None,
        dataset: Literal["fashion_mnist", "mnist"] = "fashion_mnist",
        tasks: Sequence[Sequence[int]] = DEFAULT_TASKS,
        task: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        val_size: int = 5000,
        split_seed: int = 0,
        calibration_size: int = 2000,
        calibration_seed: int = 0,
        pad_to: int | None = None,
        channels: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
        self.info = DATASETS[dataset]
        self.tasks = validate_tasks(tasks, len(self.info.classes))
        if task is not None and not 0 <= task < len(self.tasks):
            raise ValueError(f"task={task} is out of range for {len(self.tasks)} tasks")
        for name, value, low in [
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("val_size", val_size, 0),
            ("calibration_size", calibration_size, 1),
            ("channels", channels, 1),
            ("num_workers", num_workers, 0),
        ]:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if pad_to is not None and pad_to < 28:
            raise ValueError(f"pad_to must be None or >= 28 (the image size), got {pad_to}")
        self.save_hyperparameters()
        self.root = str(root) if root is not None else default_root(dataset)
        self.dataset, self.task = dataset, task
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.val_size, self.split_seed = val_size, split_seed
        self.calibration_size, self.calibration_seed = calibration_size, calibration_seed
        self.pad_to, self.channels = pad_to, channels
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._datasets: dict[tuple[str, int | None], TensorImageDataset] = {}

    # ----------------------------------------------------------------- properties
    @property
    def num_classes(self) -> int:
        return len(self.info.classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.info.classes

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def all_classes(self) -> list[int]:
        return [c for task in self.tasks for c in task]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.pad_to or 28
        return (self.channels, size, size)

    # ----------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        """Load both splits once and carve the seeded validation hold-out (idempotent)."""
        if self._splits is not None:
            return
        train_x, train_y = _cached_split(self.root, True, self.dataset)
        test_x, test_y = _cached_split(self.root, False, self.dataset)
        if self.val_size >= len(train_y):
            raise ValueError(f"val_size={self.val_size} leaves no training images (of {len(train_y)})")
        order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(self.split_seed))
        val_idx, fit_idx = order[: self.val_size].sort().values, order[self.val_size :].sort().values
        self._splits = {
            "train": (train_x[fit_idx], train_y[fit_idx]),
            "val": (train_x[val_idx], train_y[val_idx]),
            "test": (test_x, test_y),
        }

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._splits is None:
            self.setup()
        assert self._splits is not None
        return self._splits[split]

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N,H,W] -> normalised float32 [N,1,H',W'], zero-padded (in pixel space) to pad_to."""
        x = images.unsqueeze(1)
        if self.pad_to is not None and self.pad_to > x.shape[-1]:
            extra = self.pad_to - x.shape[-1]
            x = F.pad(x, (extra // 2, extra - extra // 2, extra // 2, extra - extra // 2))
        return (x.float().div_(255.0) - self.info.mean).div_(self.info.std)

    def classes_of(self, task: int | None) -> list[int]:
        """The global class ids of ``task`` (``None``: all tasks)."""
        if task is None:
            return self.all_classes
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < self.num_tasks:
            raise ValueError(f"task {task!r} is out of range for {self.num_tasks} tasks")
        return self.tasks[task]

    def dataset_for(self, split: Literal["train", "val", "test"], task: int | None) -> TensorImageDataset:
        """The images of ``split`` whose label is in ``task``'s classes (built once, then reused)."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if (split, task) not in self._datasets:
            images, labels = self._split(split)
            keep = torch.isin(labels, torch.tensor(self.classes_of(task)))
            self._datasets[split, task] = TensorImageDataset(
                self._normalise(images[keep]), labels[keep], self.channels
            )
        return self._datasets[split, task]

    def calibration_dataset(self) -> TensorImageDataset:
        """``calibration_size`` seeded draws (without replacement) from the training images of all tasks."""
        images, labels = self._split("train")
        pool = torch.isin(labels, torch.tensor(self.all_classes)).nonzero().squeeze(1)
        if self.calibration_size > len(pool):
            raise ValueError(
                f"calibration_size={self.calibration_size} exceeds the {len(pool)} training images"
            )
        g = torch.Generator().manual_seed(self.calibration_seed)
        pick = pool[torch.randperm(len(pool), generator=g)[: self.calibration_size]].sort().values
        return TensorImageDataset(self._normalise(images[pick]), labels[pick], self.channels)

    # ----------------------------------------------------------------- loaders
    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def task_train_dataloader(self, task: int | None) -> DataLoader:
        return self._loader(self.dataset_for("train", task), train=True)

    def task_val_dataloader(self, task: int | None) -> DataLoader:
        return self._loader(self.dataset_for("val", task), train=False)

    def task_test_dataloader(self, task: int | None) -> DataLoader:
        return self._loader(self.dataset_for("test", task), train=False)

    def calibration_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Unshuffled calibration images (the statistics pass sees the same samples every run)."""
        return DataLoader(
            self.calibration_dataset(),
            batch_size=batch_size or self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        return self.task_train_dataloader(self.task)

    def val_dataloader(self) -> DataLoader:
        return self.task_val_dataloader(self.task)

    def test_dataloader(self) -> DataLoader:
        return self.task_test_dataloader(self.task)
