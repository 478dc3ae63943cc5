"""MuDSC: match on λ·(activation correlation) + (1 − λ)·(weight similarity), with ZipIt! or Hungarian.

Groups (attention heads, GroupNorm groups; ``Space.group_size``) are matched as units. The official
code also searches λ over 0.1–0.9 on training accuracy; here λ is a plain hyperparameter (a sweep is
a loop over configurations).

A feature's weight slices are compared after mapping the tensor's other axes through the neighbouring
merge points' matching (as the official code does), in two passes: a forward pass over the spaces on
their producing slices with the upstream matchings applied, then every space again on all slices with
every other space's first-pass matching applied. Compared unaligned, a twin's matched features look
dissimilar on every axis but their own and the weight term outvotes the activations (MobileNetV2,
DenseNet: error 5e-2 on a permuted copy of itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from lightning_merge.graph.spec import MergeGraph, Space
from lightning_merge.match._checks import check_unit_interval
from lightning_merge.match._weights import StateDict
from lightning_merge.match.mudsc import match_mudsc, weight_similarity
from lightning_merge.match.transform import SpaceTransform
from lightning_merge.match.zip import check_alpha_beta
from lightning_merge.methods.base import register_method
from lightning_merge.methods.transform_base import TransformMethod, Transforms, check_ratio, correlation
from lightning_merge.methods.zipit import resolve_widths
from lightning_merge.stats.container import Statistics


@register_method("mudsc")
class MuDSCMerge(TransformMethod):
    """``lam`` weights activation vs. weight similarity; ``matcher`` is "zipit" (with ``alpha``,
    ``beta``, ``width``/``widths`` as in ZipIt!) or "permute"; ``measure`` the weight similarity."""

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
        perms: list[dict[str, torch.Tensor]] = [{} for _ in range(num)]
        for s in graph.spaces:  # pass 1: producers, upstream axes aligned
            roles = ("out",) if any(m.role == "out" for m in s.members) else ("out", "in")
            _add_pairing(perms, s.name, self._match_space(state_dicts, graph, s, stats, widths, perms, roles))
        return {
            s.name: self._match_space(state_dicts, graph, s, stats, widths, perms, ("out", "in"))
            for s in graph.spaces
        }

    def _match_space(
        self,
        state_dicts: list[StateDict],
        graph: MergeGraph,
        space: Space,
        stats: Statistics | None,
        widths: dict[str, int],
        perms: list[dict[str, torch.Tensor]],
        roles: tuple[str, ...],
    ) -> SpaceTransform:
        """One space's MuDSC matching, the weight slices read with ``perms`` on the other axes."""
        num = len(state_dicts)
        wsim = weight_similarity(
            state_dicts, graph, space.name, measure=self.measure, roles=roles, perms=perms
        )
        extra = {}
        if self.matcher == "zipit":
            extra = {"alpha": self.alpha, "beta": self.beta, "target_width": widths[space.name]}
        return match_mudsc(
            correlation(stats, space.name),
            wsim,
            num,
            lam=self.lam,
            matcher=self.matcher,
            group_size=space.group_size,
            **extra,
        )


def _add_pairing(perms: list[dict[str, torch.Tensor]], name: str, t: SpaceTransform) -> None:
    """``perms[i][name][k]``: model i's feature merged with model 0's feature k, where the
    transform pairs them one to one (otherwise model i's axis is compared unaligned)."""
    n = t.source_width
    if t.width != n:
        return
    slots = [t.unmerge_block(i).argmax(1).cpu() for i in range(t.num_models)]
    for i in range(1, t.num_models):
        if torch.unique(slots[i]).numel() != n or torch.unique(slots[0]).numel() != n:
            continue
        inverse = torch.empty(n, dtype=torch.long)
        inverse[slots[i]] = torch.arange(n)
        perms[i][name] = inverse[slots[0]]
