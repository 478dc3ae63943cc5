"""A small torchvision ``VisionTransformer`` for 28×28 images, with the project's shared heads.

The transformer itself is torchvision's (so the merge graph meets the real ``nn.MultiheadAttention``
with its packed in_proj, ``LayerNorm``, class token and position embedding); only its patch
embedding takes ``in_channels`` and its classifier is replaced by the project's head.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from lightning_merge.models.heads import make_head

#: hidden width at ``width=1`` (4 heads of 32)
BASE_HIDDEN = 128


class ViT(nn.Module):
    """patches (7×7 → 16 tokens + class token) → ``num_layers`` pre-norm encoder blocks → LN → head.

    ``width`` scales the hidden size (``BASE_HIDDEN``); it must stay a multiple of ``num_heads``
    because attention heads are merged whole. The MLP is ``mlp_ratio`` × hidden.
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: float = 1.0,
        head: str = "embedding",
        num_classes: int = 10,
        embed_dim: int = 32,
        image_size: int = 28,
        patch_size: int = 7,
        num_layers: int = 4,
        num_heads: int = 4,
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        hidden = round(BASE_HIDDEN * width)
        if width <= 0 or hidden % num_heads:
            raise ValueError(
                f"ViT width {width} gives hidden size {hidden}, which must be a positive multiple of "
                f"num_heads={num_heads}"
            )
        if image_size % patch_size or num_layers < 1 or mlp_ratio < 1:
            raise ValueError(
                f"ViT needs image_size divisible by patch_size, num_layers >= 1 and mlp_ratio >= 1; got "
                f"image_size={image_size}, patch_size={patch_size}, num_layers={num_layers}, "
                f"mlp_ratio={mlp_ratio}"
            )
        self.vit = VisionTransformer(
            image_size=image_size,
            patch_size=patch_size,
            num_layers=num_layers,
            num_heads=num_heads,
            hidden_dim=hidden,
            mlp_dim=mlp_ratio * hidden,
        )
        self.vit.conv_proj = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.vit.heads = nn.Identity()  # the class token's features go to the project's head
        self.feature_dim = hidden
        self.head = make_head(head, hidden, num_classes, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit(x))
