"""ZipIt!: greedy zipping of all N·n features per merge point, within models as well as across.

α scales a fused feature's similarity (α ≤ 0 forbids fusing into it again), β caps each model's
same-model fusions, and the merged width m = ``width``·n (``width`` in [1, N]; 1 is a full merge
to the source size) or a per-merge-point ``widths`` table. Partial zipping through ``stop_at``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match.zip import check_alpha_beta, match_zipit
from lightning_merge.methods.transform_base import (
    TransformMethod,
    Transforms,
    check_ratio,
    correlation,
    width_for,
)
from lightning_merge.stats.container import Statistics


def check_flag(value: object, name: str) -> bool:
    """``value`` if it is a bool; anything else (0, "yes", None) is an error naming ``name``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def resolve_widths(
    graph: MergeGraph, num_models: int, ratio: float, widths: dict[str, int] | None
) -> dict[str, int]:
    """Merged width per merge point: ``widths[name]`` where given, else ``ratio``·n."""
    widths = widths or {}
    unknown = sorted(set(widths) - {s.name for s in graph.spaces})
    if unknown:
        raise KeyError(f"widths names merge points {unknown} that the graph does not have")
    return {
        s.name: widths.get(s.name, width_for(s.size, s.group_size, num_models, ratio, s.name))
        for s in graph.spaces
    }


class ZipItMerge(TransformMethod):
    """ZipIt! (Stoica et al., 2023). Defaults α=0.3, β=0.125 are the paper's for two models.

    ``reset_sources`` (default True, as the official scripts: ``reset_bn_stats`` of every base model
    on the union training loader before ``graphify``/``transform``): ``MergeModule`` resets the
    sources' BatchNorm statistics on the calibration data before gathering the correlations."""

    name = "zipit"

    requires = frozenset({"moments"})

    def __init__(
        self,
        *,
        alpha: float = 0.3,
        beta: float = 0.125,
        width: float = 1.0,
        widths: dict[str, int] | None = None,
        stop_at: str | float | None = None,
        reset_sources: bool = True,
    ) -> None:
        super().__init__(stop_at=stop_at)
        check_alpha_beta(alpha, beta)
        check_ratio(width, "width")
        self.alpha, self.beta, self.width, self.widths = float(alpha), float(beta), float(width), widths
        self.reset_sources = check_flag(reset_sources, "reset_sources")

    def match(self, sources: Sequence[nn.Module], graph: MergeGraph, stats: Statistics | None) -> Transforms:
        num = len(sources)
        widths = resolve_widths(graph, num, self.width, self.widths)
        return {
            s.name: match_zipit(
                correlation(stats, s.name),
                num,
                alpha=self.alpha,
                beta=self.beta,
                target_width=widths[s.name],
                group_size=s.group_size,
            )
            for s in graph.spaces
        }
