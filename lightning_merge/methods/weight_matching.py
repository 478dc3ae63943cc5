"""Git Re-Basin weight matching: permutations from the weights alone (no data), then average."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match.weight_matching import match_weights
from lightning_merge.methods.transform_base import TransformMethod, Transforms
from lightning_merge.stats.container import Statistics


class WeightMatchingMerge(TransformMethod):
    """Coordinate descent over merge points maximising Σ⟨W_0, P W_i Pᵀ⟩ (``max_iter`` sweeps, ``seed``
    for the visiting order); every model is aligned to model 0."""

    name = "weight_matching"

    def __init__(self, *, max_iter: int = 100, seed: int = 0, stop_at: str | float | None = None) -> None:
        super().__init__(stop_at=stop_at)
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.max_iter, self.seed = max_iter, seed

    def match(self, sources: Sequence[nn.Module], graph: MergeGraph, stats: Statistics | None) -> Transforms:
        state_dicts = [s.state_dict() for s in sources]
        return match_weights(state_dicts, graph, max_iter=self.max_iter, seed=self.seed)
