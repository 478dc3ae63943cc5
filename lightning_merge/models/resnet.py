"""CIFAR ResNet-20 with a width multiplier (ResNet-20×w of the ZipIt! paper)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_merge.models.heads import make_head


class BasicBlock(nn.Module):
    """conv3×3 → BN → ReLU → conv3×3 → BN, plus a shortcut (1×1 conv + BN when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """conv3×3(16w) → BN → ReLU → 3 stages × 3 blocks (16w/32w/64w, stride 2 at stages 2, 3) → GAP → head."""

    def __init__(
        self,
        in_channels: int = 1,
        width: float = 1,
        head: str = "embedding",
        num_classes: int = 10,
        embed_dim: int = 32,
        blocks_per_stage: int = 3,
    ) -> None:
        super().__init__()
        if width <= 0 or blocks_per_stage < 1:
            raise ValueError(
                f"ResNet20 needs width > 0 and blocks_per_stage >= 1, got {width}, {blocks_per_stage}"
            )
        planes = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU()
        stages: list[nn.Sequential] = []
        in_planes = planes[0]
        for i, p in enumerate(planes):
            stride = 1 if i == 0 else 2
            blocks = [
                BasicBlock(in_planes if b == 0 else p, p, stride if b == 0 else 1)
                for b in range(blocks_per_stage)
            ]
            stages.append(nn.Sequential(*blocks))
            in_planes = p
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = planes[-1]
        self.head = make_head(head, planes[-1], num_classes, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.head(torch.flatten(self.pool(out), 1))
