"""Weight averaging: every feature k of every model becomes merged feature k (identity matching).

The baseline every matching method must beat; with a graph of zero merge points it is the plain
parameter average. Needs no statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match.permute import match_identity
from lightning_merge.methods.transform_base import TransformMethod, Transforms
from lightning_merge.stats.container import Statistics


class AverageMerge(TransformMethod):
    """θ = mean of the sources' parameters (no alignment)."""

    name = "average"

    def match(self, sources: Sequence[nn.Module], graph: MergeGraph, stats: Statistics | None) -> Transforms:
        return {s.name: match_identity(s.size, len(sources)) for s in graph.spaces}
