"""Stages 4–5 of a merge: run the method, then the post-merge passes (REPAIR, BatchNorm reset).

Both read the calibration data through :mod:`lightning_merge.dataflow` (whole batches per rank, sums
added once), so every rank computes the same merged weights; :func:`agree_across_ranks` checks that
and falls back to rank 0's weights if a rank drifted.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from lightning_merge.apply.batchnorm_reset import reset_batchnorm
from lightning_merge.apply.partial import PartialZipModel
from lightning_merge.apply.repair import repair_rescale
from lightning_merge.dataflow import Ranks
from lightning_merge.methods.base import MergeMethod, MergeResult
from lightning_merge.pipeline.prepare import PreparedSources
from lightning_merge.stats.container import Statistics
from lightning_merge.stats.store import model_fingerprint

log = logging.getLogger(__name__)

Repair = bool | Literal["reset", "rescale"]


def check_repair(repair: Any, method: MergeMethod) -> None:
    """``repair`` must be one of the documented values, and ``"rescale"`` needs a matching method."""
    if repair not in (True, False, "reset", "rescale"):
        raise ValueError(f"repair must be True, False, 'reset' or 'rescale', got {repair!r}")
    if repair == "rescale" and not method.has_transforms:
        raise ValueError(
            f"repair='rescale' needs a matching method's transforms; method {method.name!r} has none "
            "(use repair='reset')"
        )


@torch.no_grad()
def run_method(
    method: MergeMethod,
    sources: PreparedSources,
    stats: Statistics | None,
    calibration: Iterable[Any],
    ranks: Ranks | None = None,
) -> MergeResult:
    """The method's merge of the sources (on the sources' device)."""
    if method.requires:
        method.check_stats(stats)
    kwargs: dict[str, Any] = {"graph": sources.graph, "stats": stats}
    if sources.base is not None:
        kwargs["base"] = sources.base
    if method.needs_data:
        kwargs["data"] = calibration
    return method.merge(list(sources.models), **kwargs)


@torch.no_grad()
def post_merge(
    result: MergeResult,
    sources: PreparedSources,
    calibration: Iterable[Any],
    repair: Repair,
    ranks: Ranks | None = None,
) -> nn.Module:
    """REPAIR (``repair="rescale"``) and the BatchNorm reset (any true ``repair``) over the calibration
    data; returns the merged model in eval mode without gradients."""
    merged = result.model
    if repair == "rescale":
        if result.transforms is None:
            raise ValueError("repair='rescale' needs the method's transforms; the merge returned none")
        trunk = merged.trunk if isinstance(merged, PartialZipModel) else merged
        repair_rescale(
            trunk, list(sources.models), sources.graph, result.transforms, calibration, ranks=ranks
        )
    if repair:
        reset_batchnorm(merged, calibration, ranks=ranks)
    return merged.eval().requires_grad_(False)


def agree_across_ranks(merged: nn.Module, strategy: Any) -> bool:
    """Make every rank hold rank 0's merged weights (digests compared; broadcast only if they differ).

    ``strategy`` is a Lightning strategy (``broadcast``, ``reduce_boolean_decision``). Returns True
    when the ranks already agreed.
    """
    if int(strategy.world_size) == 1:
        return True
    mine = model_fingerprint(merged)
    if strategy.reduce_boolean_decision(mine == strategy.broadcast(mine, src=0), all=True):
        return True
    log.warning("merged weights differ across ranks; using rank 0's")
    state = strategy.broadcast({k: v.cpu() for k, v in merged.state_dict().items()}, src=0)
    merged.load_state_dict(state)
    return False
