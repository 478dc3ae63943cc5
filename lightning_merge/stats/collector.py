"""The protocol every statistic gatherer follows, so one pass can run any mix of them.

A collector owns torchmetrics ``Metric`` states (``dist_reduce_fx="sum"``, float64), registers the
hooks it needs on the N source models in :meth:`attach`, does its per-batch work in :meth:`step`
(a forward for moments and Gram matrices, a forward + backward for Fisher and K-FAC), and writes
its reduced results into the :class:`~lightning_merge.stats.container.Statistics` in :meth:`fill`.
The statistics pass (``lightning_merge.stats.collect`` and the ``MergeStatistics`` callback) owns
the loop, the device, the unpadded distributed sharding and the single in-place all-reduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from lightning_merge.stats.container import Statistics


@runtime_checkable
class Collector(Protocol):
    name: str  # the Statistics field it fills: "moments", "grams", "fisher" or "kfac"

    def attach(self, models: Sequence[nn.Module]) -> None:
        """Register hooks / allocate states for these N models."""

    def detach(self) -> None:
        """Remove every hook registered by :meth:`attach`."""

    def step(self, models: Sequence[nn.Module], inputs: torch.Tensor) -> None:
        """Accumulate one batch of inputs (already on the models' device)."""

    def states(self) -> list[torch.Tensor]:
        """Every accumulated tensor, for the in-place distributed sum-reduction."""

    def fill(self, stats: Statistics) -> None:
        """Write the (reduced) results into ``stats``."""
