"""``MergeDataModule``: the data of a merge, served through Lightning's public data hooks.

A merge reads two kinds of data: *calibration* batches (statistics, graph tracing, BatchNorm reset,
REPAIR, least squares) and one *evaluation* loader per task. Lightning asks the data module passed to
``trainer.validate`` for ``val_dataloader()``; this module answers with the per-task evaluation loaders
(the tasks' test split by default), each sharded by whole batches across ranks
(:func:`lightning_merge.dataflow.shard`, a ``DistributedSampler`` Lightning keeps as it is), so every
image is scored on exactly one rank.

``tasks`` is any data module with ``tasks`` (global class ids per task), ``num_classes``,
``task_<split>_dataloader(t)`` and ``calibration_dataloader()``:
:class:`~lightning_merge.data.tasks.DatasetTasks` (each task its own data set or data module, with its
own label space) or :class:`~lightning_merge.data.datamodule.TaskSplitDataModule` (class splits of one
data set). ``calibration`` optionally takes the
calibration images from another data module (another domain, as PLeaS' data-free variant does).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from lightning_merge.dataflow import Ranks, shard

_TASK_API = ("tasks", "num_classes", "calibration_dataloader")


class MergeDataModule(pl.LightningDataModule):
    """Per-task evaluation loaders as validation data, plus a calibration loader.

    Args:
        tasks: the data module of the tasks (see the module docstring).
        split: which split of every task the merge is evaluated on: ``"test"`` or ``"val"``.
        calibration: a data module whose ``calibration_dataloader()`` replaces the tasks' one.
    """

    def __init__(
        self,
        tasks: pl.LightningDataModule,
        split: Literal["test", "val"] = "test",
        calibration: pl.LightningDataModule | None = None,
    ) -> None:
        super().__init__()
        missing = [a for a in (*_TASK_API, f"task_{split}_dataloader") if not hasattr(tasks, a)]
        if split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {split!r}")
        if missing:
            raise TypeError(f"tasks={type(tasks).__name__} lacks {missing}: it cannot serve a merge's tasks")
        if calibration is not None and not hasattr(calibration, "calibration_dataloader"):
            raise TypeError(f"calibration={type(calibration).__name__} has no calibration_dataloader()")
        self.task_data, self.split, self.calibration = tasks, split, calibration
        # loggers record the task data's own hyperparameters (and the split), not a nested object
        self.save_hyperparameters(dict(getattr(tasks, "hparams", {})) | {"split": split})

    @staticmethod
    def of(trainer: Any, who: str) -> MergeDataModule:
        """The trainer's data module, which must be a ``MergeDataModule`` (a named error otherwise)."""
        dm = trainer.datamodule if trainer is not None else None
        if not isinstance(dm, MergeDataModule):
            raise TypeError(
                f"{who} reads its tasks, evaluation and calibration data from a MergeDataModule; got "
                f"{type(dm).__name__}: pass datamodule=MergeDataModule(tasks=TaskSplitDataModule(...)) "
                "to trainer.validate (YAML: data.class_path lightning_merge.data.MergeDataModule)"
            )
        return dm

    @property
    def tasks(self) -> list[list[int]]:
        return [list(t) for t in self.task_data.tasks]

    @property
    def num_classes(self) -> int:
        return int(self.task_data.num_classes)

    def setup(self, stage: str | None = None) -> None:
        for dm in (self.task_data, self.calibration):
            if dm is not None and hasattr(dm, "setup"):
                dm.setup(stage)

    def calibration_dataloader(self) -> Any:
        return (self.calibration or self.task_data).calibration_dataloader()

    def task_dataloader(self, task: int) -> DataLoader:
        """Task ``task``'s evaluation loader, unsharded."""
        return getattr(self.task_data, f"task_{self.split}_dataloader")(task)

    def val_dataloader(self) -> list[Any]:
        """One evaluation loader per task, this rank's whole batches of it."""
        ranks = self._ranks()
        return [shard(self.task_dataloader(t), ranks) for t in range(len(self.tasks))]

    def _ranks(self) -> Ranks:
        trainer = self.trainer
        if trainer is None:
            return Ranks.current()
        return Ranks(int(trainer.global_rank), int(trainer.world_size))
