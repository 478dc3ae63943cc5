"""Stage 1 of a merge: loading and checking the source models: checkpoint paths or modules, one architecture.

Errors name the culprit: which source (``sources[1]``), which file, which hyperparameter or
parameter differs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_merge.models.classifier import SourceClassifier

#: ``SourceClassifier`` hyperparameters that define the network (the rest is training recipe / task).
ARCH_HPARAMS = ("arch", "width", "in_channels", "image_size", "head", "num_classes", "embed_dim")


Source = str | os.PathLike | nn.Module


def describe(source: Source) -> str:
    """A source as recipes and errors name it: its path, or ``<ClassName>`` for a module."""
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"


def check_source_paths(specs: Sequence[Source], *, has_base: bool = False) -> None:
    """Every path among ``specs`` names an existing file (the last one is the base when ``has_base``)."""
    for i, spec in enumerate(specs):
        label = "base" if has_base and i == len(specs) - 1 else f"sources[{i}]"
        if isinstance(spec, (str, os.PathLike)) and not Path(spec).is_file():
            raise FileNotFoundError(f"{label}: checkpoint {os.fspath(spec)} does not exist")


def load_source(source: Source, label: str) -> SourceClassifier | nn.Module:
    """A module as is, or the ``SourceClassifier`` stored at a checkpoint path (eval mode, CPU)."""
    if isinstance(source, nn.Module):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{label} must be a checkpoint path or an nn.Module, got {type(source).__name__}")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{label}: checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # pickle / zip errors of all kinds
        raise ValueError(f"{label}: cannot read {path} as a PyTorch checkpoint ({err})") from err
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or "arch" not in hparams or "state_dict" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"{label}: {path} is not a SourceClassifier checkpoint "
            "(no state_dict with hyper_parameters.arch; "
            f"found {keys}); train sources with `lightning-merge fit` or train_source(...)"
        )
    return SourceClassifier.load_from_checkpoint(path, map_location="cpu").eval()


def architecture_of(model: nn.Module) -> dict[str, Any] | None:
    """The network-defining hyperparameters of a ``SourceClassifier``; ``None`` for a plain module."""
    if not isinstance(model, SourceClassifier):
        return None
    return {k: model.hparams[k] for k in ARCH_HPARAMS if k in model.hparams}


def network(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, SourceClassifier) else model


def check_same_architecture(models: Sequence[nn.Module], names: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the first hyperparameter or parameter where a model differs."""
    ref_arch, ref_state = architecture_of(models[0]), network(models[0]).state_dict()
    for i in range(1, len(models)):
        arch = architecture_of(models[i])
        if ref_arch is not None and arch is not None:
            for key in ARCH_HPARAMS:
                if ref_arch.get(key) != arch.get(key):
                    raise ValueError(
                        f"{names[i]} has {key}={arch.get(key)!r} but "
                        f"{names[0]} has {key}={ref_arch.get(key)!r}: "
                        "merged models must share one architecture"
                    )
        state = network(models[i]).state_dict()
        for key, tensor in ref_state.items():
            if key not in state:
                raise ValueError(
                    f"{names[i]} has no parameter {key!r} ({names[0]} has): different architectures"
                )
            if state[key].shape != tensor.shape:
                raise ValueError(
                    f"parameter {key!r} has shape {tuple(state[key].shape)} in {names[i]} but "
                    f"{tuple(tensor.shape)} in {names[0]}: different architectures"
                )
        extra = sorted(set(state) - set(ref_state))
        if extra:
            raise ValueError(
                f"{names[i]} has parameter {extra[0]!r} that {names[0]} lacks: different architectures"
            )
