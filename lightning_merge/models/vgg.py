"""CIFAR-style VGG-11 with BatchNorm, sized for 28×28 (or 32×32) inputs."""

from __future__ import annotations

import torch
from torch import nn

from lightning_merge.models.heads import make_head

#: VGG-11 configuration: channel counts, "M" = 2×2 max-pool.
VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11BN(nn.Module):
    """``features`` (conv3×3 → BN → ReLU blocks, ceil-mode pools: 28→14→7→4→2→1) → flatten → head."""

    def __init__(
        self,
        in_channels: int = 1,
        width: float = 1.0,
        head: str = "embedding",
        num_classes: int = 10,
        embed_dim: int = 32,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"VGG11BN width must be positive, got {width}")
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG11_CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
                continue
            out = max(1, round(int(item) * width))
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = channels
        self.head = make_head(head, channels, num_classes, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))
