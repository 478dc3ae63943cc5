"""Permute (activation matching, Git Re-Basin style): align every model to model 0, then average.

Per merge point, a Hungarian assignment on the cross-model block of the feature correlation
(``scipy.optimize.linear_sum_assignment``, maximised); groups (attention heads, GroupNorm groups)
are matched as units. The merged width stays n.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn

from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match.permute import match_permute
from lightning_merge.methods.transform_base import TransformMethod, Transforms, correlation
from lightning_merge.stats.container import Statistics


class PermuteMerge(TransformMethod):
    """Hungarian matching on correlations. ``anchor="mean"`` aligns model i to the running merged
    feature of models 0..i-1 instead of model 0 alone (helps for N > 2)."""

    name = "permute"

    requires = frozenset({"moments"})

    def __init__(
        self, *, anchor: Literal["first", "mean"] = "first", stop_at: str | float | None = None
    ) -> None:
        super().__init__(stop_at=stop_at)
        if anchor not in ("first", "mean"):
            raise ValueError(f"anchor must be 'first' or 'mean', got {anchor!r}")
        self.anchor = anchor

    def match(self, sources: Sequence[nn.Module], graph: MergeGraph, stats: Statistics | None) -> Transforms:
        return {
            s.name: match_permute(
                correlation(stats, s.name), len(sources), group_size=s.group_size, anchor=self.anchor
            )
            for s in graph.spaces
        }
