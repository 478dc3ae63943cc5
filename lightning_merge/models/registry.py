"""Architecture registry: adding an architecture is one entry in ``ARCHITECTURES``."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from lightning_merge.models.mlp import MLP
from lightning_merge.models.resnet import ResNet20
from lightning_merge.models.vgg import VGG11BN
from lightning_merge.models.vit import ViT

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "vgg11_bn": VGG11BN,
    "resnet20": ResNet20,
    "vit": ViT,
}

#: Arguments only some architectures use (convolutional nets do not depend on the image size).
_OPTIONAL_ARGS = ("image_size",)


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """Instantiate a registered architecture; ``image_size`` is dropped for size-agnostic ones."""
    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {arch!r}; registered: {sorted(ARCHITECTURES)}")
    cls = ARCHITECTURES[arch]
    accepted = inspect.signature(cls).parameters
    for name in _OPTIONAL_ARGS:
        if name not in accepted:
            kwargs.pop(name, None)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"architecture {arch!r} ({cls.__name__}) does not take {unknown}; it takes {list(accepted)}"
        )
    return cls(**kwargs)
