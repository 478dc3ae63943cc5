"""MuDSC: match on λ·(activation correlation) + (1 − λ)·(weight similarity), with ZipIt! or Hungarian.

Groups (attention heads, GroupNorm groups; ``Space.group_size``) are matched as units. The official
code also searches λ over 0.1–0.9 on training accuracy; here λ is a plain hyperparameter (a sweep is
a loop over configurations).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn

from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match._checks import check_unit_interval
from lightning_merge.match.mudsc import match_mudsc, weight_similarity
from lightning_merge.match.zip import check_alpha_beta
from lightning_merge.methods.transform_base import TransformMethod, Transforms, check_ratio, correlation
from lightning_merge.methods.zipit import resolve_widths
from lightning_merge.stats.container import Statistics


class MuDSCMerge(TransformMethod):
    """``lam`` weights activation vs. weight similarity; ``matcher`` is "zipit" (with ``alpha``,
    ``beta``, ``width``/``widths`` as in ZipIt!) or "permute"; ``measure`` the weight similarity."""

    name = "mudsc"

    requires = frozenset({"moments"})

    def __init__(
        self,
        *,
        lam: float = 0.5,
        matcher: Literal["zipit", "permute"] = "zipit",
        alpha: float = 0.3,
        beta: float = 0.125,
        width: float = 1.0,
        widths: dict[str, int] | None = None,
        measure: Literal["cosine", "correlation"] = "cosine",
        stop_at: str | float | None = None,
    ) -> None:
        super().__init__(stop_at=stop_at)
        check_unit_interval(lam, "lam")
        if matcher not in ("zipit", "permute"):
            raise ValueError(f"matcher must be 'zipit' or 'permute', got {matcher!r}")
        if measure not in ("cosine", "correlation"):
            raise ValueError(f"measure must be 'cosine' or 'correlation', got {measure!r}")
        check_alpha_beta(alpha, beta)
        check_ratio(width, "width")
        if matcher == "permute" and (width != 1.0 or widths):
            raise ValueError("matcher='permute' merges to the source width: leave width=1 and widths unset")
        self.lam, self.matcher, self.measure = float(lam), matcher, measure
        self.alpha, self.beta, self.width, self.widths = float(alpha), float(beta), float(width), widths

    def match(self, sources: Sequence[nn.Module], graph: MergeGraph, stats: Statistics | None) -> Transforms:
        num = len(sources)
        state_dicts = [s.state_dict() for s in sources]
        widths = resolve_widths(graph, num, self.width, self.widths)
        out = {}
        for s in graph.spaces:
            wsim = weight_similarity(state_dicts, graph, s.name, measure=self.measure)
            extra = {}
            if self.matcher == "zipit":
                extra = {"alpha": self.alpha, "beta": self.beta, "target_width": widths[s.name]}
            out[s.name] = match_mudsc(
                correlation(stats, s.name),
                wsim,
                num,
                lam=self.lam,
                matcher=self.matcher,
                group_size=s.group_size,
                **extra,
            )
        return out
