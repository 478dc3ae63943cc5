"""The user's data: Fashion-MNIST images of some classes, labelled 0..len(classes)-1 (a local label space)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_merge.data import load_split

ROOT = "/usr/share/datasets/fashion-mnist"


class FashionTask(Dataset):
    """The first ``limit`` images of ``classes`` in one split; label ``j`` is ``sorted(classes)[j]``."""

    def __init__(self, classes: list[int], train: bool = True, limit: int = 2000) -> None:
        images, labels = load_split(ROOT, train=train)
        keep = torch.isin(labels, torch.tensor(classes)).nonzero().squeeze(1)[:limit]
        self.x = images[keep].float().div(255).sub(0.286).div(0.353).unsqueeze(1)
        self.y = torch.searchsorted(torch.tensor(sorted(classes)), labels[keep])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])


class FashionTaskData(pl.LightningDataModule):
    """Training and test loaders of one task."""

    def __init__(self, classes: list[int], batch_size: int = 64, limit: int = 2000) -> None:
        super().__init__()
        self.classes, self.batch_size, self.limit = classes, batch_size, limit

    def train_dataloader(self) -> DataLoader:
        data = FashionTask(self.classes, True, self.limit)
        return DataLoader(data, batch_size=self.batch_size, shuffle=True)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(FashionTask(self.classes, False, 500), batch_size=250)
