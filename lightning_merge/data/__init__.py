"""Data: an IDX reader, the disjoint-task ``TaskSplitDataModule`` over Fashion-MNIST / MNIST, tasks from any
data sets (``DatasetTasks``) and the ``MergeDataModule`` that serves a merge."""

from lightning_merge.data.datamodule import (
    DEFAULT_ROOT,
    TaskSplitDataModule,
    TensorImageDataset,
    validate_tasks,
)
from lightning_merge.data.idx import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    default_root,
    load_split,
    read_idx,
)
from lightning_merge.data.merge_data import MergeDataModule
from lightning_merge.data.tasks import DatasetTasks, GlobalLabels, TaskData

__all__ = [
    "DATASETS",
    "DEFAULT_ROOT",
    "DatasetTasks",
    "GlobalLabels",
    "FASHION_MNIST_CLASSES",
    "MergeDataModule",
    "MNIST_CLASSES",
    "TaskData",
    "TaskSplitDataModule",
    "TensorImageDataset",
    "default_root",
    "load_split",
    "read_idx",
    "validate_tasks",
]
