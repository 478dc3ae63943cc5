"""A plain multi-layer perceptron over flattened images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_merge.models.heads import make_head


class MLP(nn.Module):
    """``flatten → [Linear → ReLU] × len(hidden) → head``; ``width`` scales every hidden size."""

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 28,
        hidden: Sequence[int] = (512, 512, 512),
        width: float = 1.0,
        head: str = "embedding",
        num_classes: int = 10,
        embed_dim: int = 32,
    ) -> None:
        super().__init__()
        if width <= 0 or not hidden:
            raise ValueError(
                f"MLP needs width > 0 and at least one hidden layer, got width={width}, hidden={hidden}"
            )
        sizes = [in_channels * image_size * image_size] + [max(1, round(h * width)) for h in hidden]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        self.layers = nn.Sequential(*layers)
        self.feature_dim = sizes[-1]
        self.head = make_head(head, self.feature_dim, num_classes, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(torch.flatten(x, 1)))
