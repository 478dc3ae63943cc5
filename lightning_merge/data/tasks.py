"""``DatasetTasks``: a merge's tasks from the user's own data sets or LightningDataModules.

Each task is its own data set with its own label space: a :class:`TaskData` gives its evaluation
samples (a ``Dataset``, or a ``LightningDataModule``'s test loader) and ``classes``, the global class
id of each of its labels (local label ``j`` is global class ``classes[j]``), so an MNIST model and a
Fashion-MNIST model, both with labels 0–9, are judged in one 20-class space as tasks
``[0..9]`` and ``[10..19]``. Tasks must not share a global id (a named error).

Calibration (statistics, BatchNorm reset, REPAIR, least squares) reads a seeded draw of
``calibration_size`` samples from ``calibration`` (any data set, another domain included, as PLeaS'
data-free variant needs) or, by default, from the tasks' own ``calibration`` sets (a data module's
training set). Serve it to a merge as ``MergeDataModule(tasks=DatasetTasks(...))``; YAML::

    data:
      class_path: lightning_merge.data.MergeDataModule
      init_args:
        tasks:
          class_path: lightning_merge.data.DatasetTasks
          init_args:
            tasks:
              - {name: mnist, classes: [0, 1, ...], test: {class_path: my.MnistTest, init_args: {...}}}
              - {name: fashion, classes: [10, 11, ...], datamodule: {class_path: my.FashionData}}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from lightning_merge.data.datamodule import validate_tasks


@dataclass
class TaskData:
    """One task: its evaluation samples and the global ids of its labels.

    Args:
        classes: global class id of each local label (``classes[j]`` for label ``j``).
        test: the evaluation samples, ``(inputs, label)`` pairs.
        datamodule: instead of ``test``: a data module whose ``test_dataloader()`` holds the evaluation
            samples and whose ``train_dataloader()`` (when ``calibration`` is not given) calibrates.
        calibration: samples this task adds to the default calibration draw (e.g. its training set).
        name: how results and errors name the task (default ``task<i>``).
        global_labels: the data set already yields global ids (no remapping; each must be in ``classes``).
    """

    classes: list[int]
    test: Dataset | None = None
    datamodule: pl.LightningDataModule | None = None
    calibration: Dataset | None = None
    name: str | None = None
    global_labels: bool = False


class GlobalLabels(Dataset):
    """A task's samples with each label replaced by its global class id."""

    def __init__(self, dataset: Dataset, classes: Sequence[int], task: str, already_global: bool) -> None:
        self.dataset, self.classes, self.task, self.already_global = (
            dataset,
            list(classes),
            task,
            already_global,
        )
        self._allowed = frozenset(self.classes)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        sample = self.dataset[index]
        if not isinstance(sample, (tuple, list)) or len(sample) < 2:
            raise TypeError(f"{self.task}: a sample must be (inputs, label), got {type(sample).__name__}")
        inputs, label = sample[0], int(sample[1])
        if self.already_global:
            if label not in self._allowed:
                raise ValueError(f"{self.task}: label {label} is not among its classes {self.classes}")
            return inputs, torch.tensor(label)
        if not 0 <= label < len(self.classes):
            raise ValueError(
                f"{self.task}: label {label} has no global class (its classes list {len(self.classes)} ids: "
                f"local labels 0..{len(self.classes) - 1})"
            )
        return inputs, torch.tensor(self.classes[label])


class DatasetTasks(pl.LightningDataModule):
    """Tasks from any data sets, for :class:`~lightning_merge.data.MergeDataModule`.

    Args:
        tasks: one :class:`TaskData` per task (the order of the sources: source i is judged on task i).
        calibration: the calibration data set (or data module: its ``train_dataloader()``'s data set);
            default: the tasks' own calibration sets together.
        calibration_size: samples drawn (seeded, without replacement) for calibration; all if fewer.
        num_classes: size of the global label space (default: largest class id + 1).
    """

    def __init__(
        self,
        tasks: list[TaskData],
        calibration: Dataset | pl.LightningDataModule | None = None,
        calibration_size: int = 2000,
        calibration_seed: int = 0,
        batch_size: int = 500,
        num_classes: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not tasks or not all(isinstance(t, TaskData) for t in tasks):
            raise TypeError(f"tasks must be a non-empty list of TaskData, got {tasks!r}")
        for i, task in enumerate(tasks):
            if (task.test is None) == (task.datamodule is None):
                raise ValueError(
                    f"task {task.name or i}: give exactly one of test= (a Dataset) or datamodule="
                )
        ids = [c for t in tasks for c in t.classes]
        self.num_classes = int(num_classes) if num_classes is not None else max(ids, default=-1) + 1
        self.names = [t.name or f"task{i}" for i, t in enumerate(tasks)]
        try:
            self.tasks = validate_tasks([list(t.classes) for t in tasks], self.num_classes)
        except ValueError as err:
            raise ValueError(f"DatasetTasks (tasks {self.names}): {err}") from err
        for name, value in [("calibration_size", calibration_size), ("batch_size", batch_size)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.task_data, self.calibration = list(tasks), calibration
        self.calibration_size, self.calibration_seed = calibration_size, calibration_seed
        self.batch_size, self.num_workers = batch_size, num_workers
        self._test: dict[int, Dataset] = {}
        self._set_up = False
        self.save_hyperparameters(
            {"tasks": [{"name": n, "classes": c} for n, c in zip(self.names, self.tasks, strict=True)]}
            | {"calibration_size": calibration_size, "calibration_seed": calibration_seed}
            | {"num_classes": self.num_classes, "batch_size": batch_size}
        )

    def setup(self, stage: str | None = None) -> None:
        """Set up every data module given (once): test data for evaluation, fit data for calibration."""
        if self._set_up:
            return
        self._set_up = True
        for dm in [t.datamodule for t in self.task_data] + [self.calibration]:
            if isinstance(dm, pl.LightningDataModule):
                dm.setup("test")
                dm.setup("fit")

    def task_dataset(self, task: int) -> Dataset:
        """Task ``task``'s evaluation samples with global labels."""
        data = self.task_data[task]
        if task not in self._test:
            raw = (
                data.test if data.test is not None else _dataset_of(data.datamodule, "test", self.names[task])
            )
            self._test[task] = GlobalLabels(raw, data.classes, self.names[task], data.global_labels)
        return self._test[task]

    def task_test_dataloader(self, task: int) -> DataLoader:
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < len(self.tasks):
            raise ValueError(f"task {task!r} is out of range for {len(self.tasks)} tasks")
        return self._loader(self.task_dataset(task))

    def calibration_dataset(self) -> Dataset:
        """A seeded draw of ``calibration_size`` samples from the calibration data."""
        pool = self._calibration_pool()
        if len(pool) == 0:  # type: ignore[arg-type]
            raise ValueError("the calibration data set is empty")
        g = torch.Generator().manual_seed(self.calibration_seed)
        pick = torch.randperm(len(pool), generator=g)[: self.calibration_size].sort().values  # type: ignore[arg-type]
        return Subset(pool, pick.tolist())

    def _calibration_pool(self) -> Dataset:
        if self.calibration is not None:
            if isinstance(self.calibration, pl.LightningDataModule):
                return _dataset_of(self.calibration, "train", "calibration")
            return self.calibration
        parts = []
        for i, data in enumerate(self.task_data):
            raw = data.calibration
            if raw is None and data.datamodule is not None:
                raw = _dataset_of(data.datamodule, "train", self.names[i])
            if raw is None:
                raise ValueError(
                    f"task {self.names[i]} has no calibration data: give it calibration= (e.g. its training "
                    "set) or give DatasetTasks a calibration= data set"
                )
            parts.append(GlobalLabels(raw, data.classes, self.names[i], data.global_labels))
        return ConcatDataset(parts)

    def calibration_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """Unshuffled calibration samples (the statistics pass sees the same samples every run)."""
        return self._loader(self.calibration_dataset(), batch_size)

    def _loader(self, dataset: Dataset, batch_size: int | None = None) -> DataLoader:
        return DataLoader(
            dataset, batch_size=batch_size or self.batch_size, shuffle=False, num_workers=self.num_workers
        )


def _dataset_of(dm: pl.LightningDataModule | None, split: str, task: str) -> Dataset:
    """The data set behind a data module's ``<split>_dataloader()`` (the merge makes its own loaders)."""
    loader = getattr(dm, f"{split}_dataloader")()
    if isinstance(loader, (list, tuple)) and len(loader) == 1:
        loader = loader[0]
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"{task}: {type(dm).__name__}.{split}_dataloader() must return one torch DataLoader, "
            f"got {type(loader).__name__}"
        )
    return loader.dataset
