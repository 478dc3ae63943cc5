"""PLeaS: partial matching to a merged width between n and N·n, then a layer-wise least-squares refit.

1. Per merge point, fuse only the best-matching cross-model features and keep the rest apart: two
   models use PLeaS' partial Hungarian matching (the k = 2n − m best pairs); N > 2 models align
   every model to model 0 by Hungarian matching and fuse the N·n − m best-scoring of those
   (N − 1)·n pairs (:func:`partial_to_first`; equal to the two-model rule up to feature order,
   always feasible for m in [n, N·n], and Permute at m = n).
2. Merge the weights through those transforms, then re-fit every Linear/Conv2d in forward order so
   the merged model's own inputs reproduce the sources' (partially permuted) outputs
   (:func:`lightning_merge.apply.least_squares.least_squares_refit`).

The data-free variant is the same with a loader from another domain: ``merge(..., data=...)`` uses
whatever loader it is given (the MergeModule decides which).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_merge.apply.least_squares import least_squares_refit
from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match._checks import check_similarity, check_target_width
from lightning_merge.match.partial import match_partial
from lightning_merge.match.permute import group_hungarian
from lightning_merge.match.transform import SpaceTransform, from_assignment
from lightning_merge.methods.transform_base import TransformMethod, Transforms, check_ratio, correlation
from lightning_merge.methods.zipit import resolve_widths
from lightning_merge.stats.container import Statistics


def partial_to_first(
    corr: torch.Tensor, num_models: int, *, target_width: int, group_size: int = 1
) -> SpaceTransform:
    """N-model partial matching: Hungarian-align each model to model 0, fuse the best N·n − m pairs.

    Merged layout: model 0's n features (with the partners fused into them), then the unfused
    features of models 1, 2, … in their own order.
    """
    corr = check_similarity(corr, num_models)
    n = corr.shape[0] // num_models
    check_target_width(target_width, n, num_models)
    if group_size > 1 and target_width != n:
        raise ValueError(
            f"partial matching fuses single features, which would split groups of {group_size}: "
            f"use target_width = n = {n} for this merge point (width 1 or a per-point entry in widths)"
        )
    rows = torch.arange(n, device=corr.device)
    perms = [group_hungarian(corr[:n, i * n : (i + 1) * n], group_size) for i in range(1, num_models)]
    scores = torch.stack([corr[rows, (i + 1) * n + p] for i, p in enumerate(perms)])  # (N-1, n)
    k = num_models * n - target_width
    order = torch.sort(-scores.flatten(), stable=True).indices
    fused = torch.zeros(scores.numel(), dtype=torch.bool, device=corr.device)
    fused[order[:k]] = True
    fused = fused.view(num_models - 1, n)
    assign = torch.empty(num_models * n, dtype=torch.long, device=corr.device)
    assign[:n] = rows
    nxt = n
    for i, p in enumerate(perms, start=1):
        assign[i * n + p[fused[i - 1]]] = rows[fused[i - 1]]
        rest = torch.sort(p[~fused[i - 1]]).values
        assign[i * n + rest] = nxt + torch.arange(rest.numel(), device=corr.device)
        nxt += rest.numel()
    return from_assignment(assign, target_width, num_models)


class PLeaSMerge(TransformMethod):
    """``width`` = m/n in [1, N] (or per-merge-point ``widths``); ``ridge`` is the relative Tikhonov
    term of the solve; ``max_batches`` caps the batches read per layer; ``refit=False`` skips step 2."""

    name = "pleas"

    requires = frozenset({"moments"})

    def __init__(
        self,
        *,
        width: float = 1.0,
        widths: dict[str, int] | None = None,
        ridge: float = 1e-4,
        max_batches: int | None = None,
        refit: bool = True,
        stop_at: str | float | None = None,
    ) -> None:
        super().__init__(stop_at=stop_at)
        check_ratio(width, "width")
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
            raise ValueError(f"ridge must be a number >= 0, got {ridge!r}")
        if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 1):
            raise ValueError(f"max_batches must be a positive integer or None, got {max_batches!r}")
        self.width, self.widths, self.ridge = float(width), widths, float(ridge)
        self.max_batches, self.refit = max_batches, refit

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        """Only the least-squares refit reads the calibration data."""
        return self.refit

    def match(self, sources: Sequence[nn.Module], graph: MergeGraph, stats: Statistics | None) -> Transforms:
        num = len(sources)
        widths = resolve_widths(graph, num, self.width, self.widths)
        out = {}
        for s in graph.spaces:
            corr = correlation(stats, s.name)
            if num == 2 and s.group_size == 1:  # PLeaS' own two-model rule
                out[s.name] = match_partial(corr, num, target_width=widths[s.name])
            else:
                out[s.name] = partial_to_first(
                    corr, num, target_width=widths[s.name], group_size=s.group_size
                )
        return out

    def refine(
        self,
        merged: nn.Module,
        sources: Sequence[nn.Module],
        graph: MergeGraph,
        transforms: Mapping[str, SpaceTransform],
        data: Iterable[Any] | None,
    ) -> dict[str, Any]:
        if not self.refit:
            return {}
        if data is None:
            raise ValueError("pleas needs a data loader for its least-squares refit (data=None given)")
        least_squares_refit(
            merged, sources, graph, transforms, data, ridge=self.ridge, max_batches=self.max_batches
        )
        return {}
