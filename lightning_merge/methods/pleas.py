"""PLeaS: partial matching to a merged width between n and N·n, then a layer-wise least-squares refit.

1. Per merge point, fuse only the best-matching cross-model features (two models: PLeaS' partial
   Hungarian, the k = 2n − m best pairs; N > 2: ZipIt!'s greedy rule restricted to cross-model
   fusions, α = 0 and β = 0, which never fuses two features of one model) and keep the rest apart.
2. Merge the weights through those transforms, then re-fit every Linear/Conv2d in forward order so
   the merged model's own inputs reproduce the sources' (partially permuted) outputs
   (:func:`lightning_merge.apply.least_squares.least_squares_refit`).

The data-free variant is the same with a loader from another domain: ``merge(..., data=...)`` uses
whatever loader it is given (the MergeModule decides which).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from lightning_merge.apply.least_squares import least_squares_refit
from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match.partial import match_partial
from lightning_merge.match.transform import SpaceTransform
from lightning_merge.match.zip import match_zipit
from lightning_merge.methods.base import register_method
from lightning_merge.methods.transform_base import TransformMethod, Transforms, check_ratio, correlation
from lightning_merge.methods.zipit import resolve_widths
from lightning_merge.stats.container import Statistics


@register_method("pleas")
class PLeaSMerge(TransformMethod):
    """``width`` = m/n in [1, N] (or per-merge-point ``widths``); ``ridge`` is the relative Tikhonov
    term of the solve; ``max_batches`` caps the batches read per layer; ``refit=False`` skips step 2."""

    requires = frozenset({"moments"})
    needs_data = True

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
        self.needs_data = refit

    def match(self, sources: Sequence[nn.Module], graph: MergeGraph, stats: Statistics | None) -> Transforms:
        num = len(sources)
        widths = resolve_widths(graph, num, self.width, self.widths)
        out = {}
        for s in graph.spaces:
            corr = correlation(stats, s.name)
            if num == 2 and s.group_size == 1:
                out[s.name] = match_partial(corr, num, target_width=widths[s.name])
            else:
                out[s.name] = match_zipit(
                    corr, num, alpha=0.0, beta=0.0, target_width=widths[s.name], group_size=s.group_size
                )
        return out

    def refine(
        self,
        merged: nn.Module,
        sources: Sequence[nn.Module],
        graph: MergeGraph,
        transforms: Mapping[str, SpaceTransform],
        data: Iterable[Any] | None,
    ) -> nn.Module:
        if not self.refit:
            return merged
        if data is None:
            raise ValueError("pleas needs a data loader for its least-squares refit (data=None given)")
        return least_squares_refit(
            merged, sources, graph, transforms, data, ridge=self.ridge, max_batches=self.max_batches
        )
