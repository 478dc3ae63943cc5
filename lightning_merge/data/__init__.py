"""Data: an IDX reader and the disjoint-task ``TaskSplitDataModule`` over Fashion-MNIST / MNIST."""

from lightning_merge.data.datamodule import (
    DEFAULT_ROOT,
    TaskSplitDataModule,
    TensorImageDataset,
    validate_tasks,
)
from lightning_merge.data.idx import DATASETS, FASHION_MNIST_CLASSES, MNIST_CLASSES, load_split, read_idx
from lightning_merge.data.merge_data import MergeDataModule

__all__ = [
    "DATASETS",
    "DEFAULT_ROOT",
    "FASHION_MNIST_CLASSES",
    "MergeDataModule",
    "MNIST_CLASSES",
    "TaskSplitDataModule",
    "TensorImageDataset",
    "load_split",
    "read_idx",
    "validate_tasks",
]
