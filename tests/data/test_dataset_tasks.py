"""``DatasetTasks``: tasks from any data sets, each with its own label space mapped to global ids."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge.data import DatasetTasks, MergeDataModule, TaskData


def local_dataset(n: int, num_labels: int, seed: int, channels: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, channels, 4, 4, generator=g), torch.arange(n) % num_labels)


class UserData(pl.LightningDataModule):
    """A user's data module: train and test sets with local labels."""

    def __init__(self) -> None:
        super().__init__()
        self.setups: list[str] = []

    def setup(self, stage: str) -> None:
        self.setups.append(stage)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(local_dataset(30, 3, seed=1), batch_size=4, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(local_dataset(9, 3, seed=2), batch_size=4)


def test_each_task_keeps_its_own_data_and_maps_local_labels_to_global_ids() -> None:
    user = UserData()
    tasks = DatasetTasks(
        [
            TaskData(
                classes=[7, 2, 9, 4], test=local_dataset(10, 4, seed=0), calibration=local_dataset(8, 4, 3)
            ),
            TaskData(classes=[0, 1, 3], datamodule=user, name="digits"),
        ],
        calibration_size=100,
        batch_size=6,
    )
    merge_data = MergeDataModule(tasks)
    merge_data.setup("validate")
    assert merge_data.tasks == [[7, 2, 9, 4], [0, 1, 3]] and merge_data.num_classes == 10
    assert user.setups == ["test", "fit"]
    first, second = merge_data.val_dataloader()
    labels = torch.cat([y for _, y in first])
    assert labels.tolist() == [[7, 2, 9, 4][i % 4] for i in range(10)]
    images = torch.cat([x for x, _ in second])
    torch.testing.assert_close(images, local_dataset(9, 3, seed=2).tensors[0], rtol=0, atol=0)
    assert torch.cat([y for _, y in second]).tolist() == [[0, 1, 3][i % 3] for i in range(9)]
    calibration = list(merge_data.calibration_dataloader())
    assert sum(len(x) for x, _ in calibration) == 8 + 30  # every sample of both tasks' training data
    assert set(torch.cat([y for _, y in calibration]).tolist()) == {0, 1, 2, 3, 4, 7, 9}


def test_calibration_from_another_data_set_is_a_seeded_draw() -> None:
    other = local_dataset(50, 5, seed=9, channels=1)
    make = lambda seed: DatasetTasks(  # noqa: E731
        [
            TaskData(classes=[0, 1], test=local_dataset(4, 2, 0)),
            TaskData(classes=[2], test=local_dataset(4, 1, 1)),
        ],
        calibration=other,
        calibration_size=20,
        calibration_seed=seed,
    )
    first = torch.cat([x for x, _ in make(0).calibration_dataloader()])
    assert first.shape == (20, 1, 4, 4)
    torch.testing.assert_close(first, torch.cat([x for x, _ in make(0).calibration_dataloader()]))
    assert not torch.equal(first, torch.cat([x for x, _ in make(1).calibration_dataloader()]))
    rows = {tuple(r.flatten().tolist()) for r in other.tensors[0]}
    assert all(tuple(r.flatten().tolist()) in rows for r in first)  # drawn from the other data set


def test_tasks_with_overlapping_global_ids_are_named() -> None:
    with pytest.raises(ValueError, match=r"tasks \['mnist', 'fashion'\]\): class 3 appears in tasks 0 and 1"):
        DatasetTasks(
            [
                TaskData(classes=[0, 1, 2, 3], test=local_dataset(4, 4, 0), name="mnist"),
                TaskData(classes=[3, 4], test=local_dataset(4, 2, 0), name="fashion"),
            ]
        )


def test_labels_outside_a_tasks_label_space_are_named() -> None:
    tasks = DatasetTasks([TaskData(classes=[5, 6], test=local_dataset(6, 3, 0), name="shoes")])
    with pytest.raises(ValueError, match=r"shoes: label 2 has no global class .*local labels 0..1"):
        list(tasks.task_test_dataloader(0))
    already = DatasetTasks([TaskData(classes=[0, 1], test=local_dataset(6, 3, 0), global_labels=True)])
    with pytest.raises(ValueError, match=r"task0: label 2 is not among its classes \[0, 1\]"):
        list(already.task_test_dataloader(0))


def test_bad_task_definitions_are_named() -> None:
    with pytest.raises(ValueError, match="task t: give exactly one of test="):
        DatasetTasks([TaskData(classes=[0], name="t")])
    with pytest.raises(ValueError, match="task nocal has no calibration data"):
        DatasetTasks(
            [TaskData(classes=[0], test=local_dataset(2, 1, 0), name="nocal")]
        ).calibration_dataloader()
