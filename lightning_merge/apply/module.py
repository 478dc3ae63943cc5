"""Turn a merged state dict into a plain ``nn.Module`` of the merged architecture.

The merged model is a deep copy of a source with every parameter and buffer replaced; when a merged
width differs from the source width, tensors are swapped for new ones of the merged shape and the
modules' size attributes (``in_features``, ``num_features``, ``embed_dim`` …) are updated so that
``repr``, ``extra_repr`` and any code reading them stay truthful. The result does not depend on this
library at inference time.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter/buffer ``name`` of ``module`` by ``value`` (new object when the shape changes)."""
    if name in module._parameters:
        old = module._parameters[name]
        if old is not None and old.shape == value.shape:
            with torch.no_grad():
                old.copy_(value.to(old.dtype))
        else:
            requires_grad = True if old is None else old.requires_grad
            module._parameters[name] = nn.Parameter(value.detach().clone(), requires_grad=requires_grad)
    elif name in module._buffers:
        old = module._buffers[name]
        if old is not None and old.shape == value.shape:
            old.copy_(value.to(old.dtype))
        else:
            module._buffers[name] = value.detach().clone()
    else:
        raise KeyError(f"module {type(module).__name__} has no parameter or buffer {name!r}")


def _sync_attributes(module: nn.Module) -> None:
    """Make the size attributes of standard layers agree with their (possibly resized) tensors."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        if module.weight is not None:
            module.num_features = module.weight.shape[0]
        elif module.running_mean is not None:
            module.num_features = module.running_mean.shape[0]
    elif isinstance(module, nn.GroupNorm) and module.weight is not None:
        module.num_channels = module.weight.shape[0]
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape
    elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        e = module.in_proj_weight.shape[0] // 3
        if e % module.num_heads:
            raise ValueError(f"merged embed_dim {e} is not divisible by num_heads={module.num_heads}")
        module.embed_dim = module.kdim = module.vdim = e
        module.head_dim = e // module.num_heads


def resize_to_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True
) -> nn.Module:
    """Load ``state_dict`` into ``model`` in place, resizing tensors whose shape differs.

    Every key must exist in the model and, when ``strict``, every parameter must be given, so a saved
    merged model can be rebuilt from its source architecture plus its safetensors file.
    """
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    unknown = [k for k in state_dict if k not in own]
    if unknown:
        raise KeyError(
            f"state dict key {unknown[0]!r} is not a parameter or buffer of {type(model).__name__}"
        )
    missing = [k for k, _ in model.named_parameters() if k not in state_dict]
    if missing and strict:
        raise KeyError(f"state dict lacks parameter {missing[0]!r} of {type(model).__name__}")
    touched: set[str] = set()
    for key, value in state_dict.items():
        owner, _, name = key.rpartition(".")
        module = model.get_submodule(owner)
        _set_tensor(module, name, value)
        touched.add(owner)
    for owner in touched:
        _sync_attributes(model.get_submodule(owner))
    return model


def build_merged_module(
    template: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True
) -> nn.Module:
    """A deep copy of ``template`` (a source) carrying the merged ``state_dict``; sources are untouched."""
    model = copy.deepcopy(template)
    return resize_to_state_dict(model, state_dict, strict=strict)
