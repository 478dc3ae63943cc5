"""Task arithmetic (Ilharco et al.): add the scaled sum of the task vectors to the base."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from lightning_merge.graph.spec import MergeGraph
from lightning_merge.methods import same_base as sb
from lightning_merge.methods.base import MergeMethod, register_method
from lightning_merge.stats.container import Statistics


@register_method("task_arithmetic")
class TaskArithmetic(MergeMethod):
    """θ = θ₀ + λ Σᵢ (θᵢ − θ₀) on every parameter; buffers averaged.

    Without a base the reference θ₀ is the sources' mean, whose task vectors sum to zero: the
    result is then plain weight averaging whatever λ (λ = 1/N with a base is also the average).
    """

    def __init__(self, scaling: float = 1.0) -> None:
        sb.check_scaling(scaling)
        self.scaling = float(scaling)

    def merge(
        self,
        sources: Sequence[nn.Module],
        *,
        graph: MergeGraph | None = None,
        stats: Statistics | None = None,
        base: nn.Module | None = None,
        data: Iterable[Any] | None = None,
    ) -> nn.Module:
        states = sb.check_sources(sources, base, self.name)
        params = sb.parameter_names(sources[0])
        base_st = sb.base_state(base)
        merged = sb.buffers_rule(states, params)
        for name in params:
            if base_st is None:
                merged[name] = sb.average(states, name)
            else:
                merged[name] = sb.task_arithmetic(states, base_st, name, self.scaling)
        return sb.build(sources[0], merged)
