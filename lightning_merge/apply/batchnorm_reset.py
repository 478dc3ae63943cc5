"""Recompute BatchNorm running statistics of a merged model over data (the "BatchNorm reset").

Merging averages running means/variances linearly, which is wrong for the merged features' true
statistics; without a reset merged ResNets collapse. We run the model in train mode (each BatchNorm
normalises with its batch statistics, exactly as ``momentum=None`` resets do) and, through forward
pre-hooks, accumulate per channel count, Σx and Σx² in float64. The running statistics are then the
*pooled* mean and unbiased variance over every sample the loader gave, so they do not depend on how
the data was split into batches (unlike an average of per-batch variances). Across ranks the loader
is sharded by whole batches and the sums added once (:mod:`lightning_merge.dataflow`), so every rank
ends with the statistics of a single process that saw all the data.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_merge.dataflow import Ranks, all_reduce_sum_, check_max_batches, model_device, sharded_inputs


class _Accumulator:
    """Per-channel count, Σx, Σx² of one BatchNorm's inputs, in float64."""

    def __init__(self, bn: _BatchNorm) -> None:
        c, dev = bn.num_features, bn.running_mean.device
        self.sums = torch.zeros(2 * c + 1, dtype=torch.float64, device=dev)  # [Σx, Σx², count]
        self.channels = c

    def __call__(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].detach().to(torch.float64).transpose(0, 1).reshape(self.channels, -1)
        c = self.channels
        self.sums[:c] += x.sum(1)
        self.sums[c : 2 * c] += (x * x).sum(1)
        self.sums[-1] += x.shape[1]


def reset_batchnorm(
    model: nn.Module, data: Iterable[Any], *, max_batches: int | None = None, ranks: Ranks | None = None
) -> nn.Module:
    """Set every tracking BatchNorm's running mean/variance to its pooled statistics over ``data``.

    Returns ``model`` (modified in place) with its training flag restored. A model without BatchNorm
    is returned unchanged; an empty loader is an error.
    """
    check_max_batches(max_batches)
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        return model
    accs = [_Accumulator(bn) for bn in bns]
    handles = [bn.register_forward_pre_hook(acc) for bn, acc in zip(bns, accs, strict=True)]
    was_training, device = model.training, model_device(model)
    seen = torch.zeros((), dtype=torch.float64, device=device)
    try:
        model.train()
        with torch.no_grad():
            for inputs in sharded_inputs(data, device, ranks, max_batches=max_batches):
                model(inputs)
                seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    flat = torch.cat([a.sums for a in accs])
    all_reduce_sum_([flat, seen], ranks)  # one sum over ranks
    if seen.item() == 0:
        raise ValueError("reset_batchnorm got no batches: the data loader is empty")
    _write_statistics(bns, flat.split([a.sums.numel() for a in accs]), int(seen.item()))
    return model


def _write_statistics(bns: list[_BatchNorm], sums: Iterable[torch.Tensor], num_batches: int) -> None:
    for bn, s in zip(bns, sums, strict=True):
        c = bn.num_features
        count = s[-1]
        mean = s[:c] / count
        var = (s[c : 2 * c] - count * mean * mean).clamp_min(0) / (count - 1).clamp_min(1)
        bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
        bn.running_var.copy_(var.to(bn.running_var.dtype))
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.fill_(num_batches)
