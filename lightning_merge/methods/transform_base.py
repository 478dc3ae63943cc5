"""Shared base of the methods for models from different initialisations (match → transform → apply).

Every such method computes one :class:`~lightning_merge.match.transform.SpaceTransform` per merge
point (:meth:`TransformMethod.match`) and then applies them all the same way: W = M_out ·
blockdiag(W_i) · U_in through the merge graph, giving a plain module of the merged architecture, or,
with ``stop_at``, a partial zip (merged trunk up to a cut point, every source's own tail after it).
BatchNorm reset and REPAIR are not part of ``merge``: the MergeModule (or the caller) runs
:func:`lightning_merge.apply.batchnorm_reset.reset_batchnorm` (and, asked for,
:func:`lightning_merge.apply.repair.repair_rescale` with the result's ``transforms``) afterwards.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from torch import nn

from lightning_merge.apply.module import build_merged_module
from lightning_merge.apply.partial import build_partial, resolve_cut
from lightning_merge.apply.weights import merge_state_dicts
from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match.transform import SpaceTransform
from lightning_merge.methods.base import MergeMethod, MergeResult
from lightning_merge.stats.container import Statistics

Transforms = dict[str, SpaceTransform]


def check_stop_at(stop_at: str | float | None) -> None:
    if stop_at is None or isinstance(stop_at, str):
        if isinstance(stop_at, str) and not stop_at:
            raise ValueError("stop_at must be a cut point's node name, a depth fraction in [0, 1] or None")
        return
    if isinstance(stop_at, bool) or not isinstance(stop_at, (int, float)) or not 0.0 <= stop_at <= 1.0:
        raise ValueError(
            f"stop_at must be a cut point's node name, a depth fraction in [0, 1] or None, got {stop_at!r}"
        )


def check_ratio(value: float, name: str, *, lo: float = 1.0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= lo:
        raise ValueError(f"{name} must be a number >= {lo}, got {value!r}")


def check_statistics_match(stats: Statistics | None, graph: MergeGraph, num_models: int) -> None:
    """Statistics must come from these N models under this very graph (same digest)."""
    if stats is None:
        return
    if stats.graph_digest != graph.digest():
        raise ValueError(
            f"statistics were gathered under merge graph {stats.graph_digest!r}, but the models' graph is "
            f"{graph.digest()!r}: they belong to other models or another architecture; gather them again"
        )
    if stats.num_models != num_models:
        raise ValueError(f"statistics are for {stats.num_models} models, but {num_models} sources were given")


def width_for(space_size: int, group_size: int, num_models: int, ratio: float, name: str) -> int:
    """Merged width round(ratio·n) inside [n, N·n]; with groups (heads) a multiple of their number.

    Grouped spaces are zipped per aligned tuple of groups, so each group gets m / groups features.
    """
    if ratio > num_models:
        raise ValueError(
            f"width ratio {ratio} is outside [1, N] = [1, {num_models}] for merge point {name!r}"
        )
    unit = space_size // group_size if group_size > 1 else 1
    m = round(ratio * space_size / unit) * unit
    return min(max(m, space_size), num_models * space_size)


class TransformMethod(MergeMethod):
    """Base for matching-based methods: ``merge`` = ``match`` → merged weights → merged module.

    ``stop_at``: None for a full merge, or a cut point (its fx node name, or a depth fraction in [0, 1],
    the nearest cut point is used) for a partial zip returning every source's output.
    The result carries the transforms, for post-merge steps such as REPAIR.
    """

    has_transforms = True

    def __init__(self, *, stop_at: str | float | None = None) -> None:
        check_stop_at(stop_at)
        self.stop_at = stop_at

    @abstractmethod
    def match(self, sources: Sequence[nn.Module], graph: MergeGraph, stats: Statistics | None) -> Transforms:
        """One transform per merge point of ``graph``."""

    def refine(
        self,
        merged: nn.Module,
        sources: Sequence[nn.Module],
        graph: MergeGraph,
        transforms: Mapping[str, SpaceTransform],
        data: Iterable[Any] | None,
        stats: Statistics | None = None,
    ) -> dict[str, Any]:
        """Hook for a step after the weights are merged (PLeaS' least squares, from ``stats`` or a data
        pass): updates ``merged`` (the full model, or a partial zip's trunk) in place and returns its
        diagnostics; default: none."""
        return {}

    def merge(
        self,
        sources: Sequence[nn.Module],
        *,
        graph: MergeGraph | None,
        stats: Statistics | None,
        base: nn.Module | None = None,
        data: Iterable[Any] | None = None,
    ) -> MergeResult:
        if len(sources) < 2:
            raise ValueError(f"method {self.name!r} merges at least 2 sources, got {len(sources)}")
        if graph is None:
            raise ValueError(f"method {self.name!r} needs the sources' merge graph (graph=None given)")
        self.check_stats(stats)
        check_statistics_match(stats, graph, len(sources))
        if self.needs_data and data is None:
            raise ValueError(f"method {self.name!r} needs a data loader (data=None given)")
        transforms = dict(self.match(sources, graph, stats))
        if self.stop_at is not None:
            cut = resolve_cut(graph, self.stop_at)
            partial = build_partial(sources, graph, transforms, cut)
            diagnostics = self.refine(partial.trunk, sources, graph, transforms, data, stats)
            return MergeResult(partial, transforms, diagnostics)
        merged_sd = merge_state_dicts([s.state_dict() for s in sources], graph, transforms)
        merged = build_merged_module(sources[0], merged_sd)
        return MergeResult(merged, transforms, self.refine(merged, sources, graph, transforms, data, stats))


#: weight of the scale tie-break in ``correlation``: far below any correlation gap real data produce
SCALE_TIE_BREAK = 1e-9


def check_moments(stats: Statistics | None, space: str) -> None:
    """A merge point without feature moments is named before any matching starts."""
    if stats is None or space not in stats.moments:
        raise KeyError(
            f"no feature moments for merge point {space!r}; run the statistics pass with 'moments'"
        )


class Correlations(Mapping[str, Any]):
    """:func:`correlation` of each merge point, computed when read (nothing held): a consumer that
    visits every point repeatedly (MuDSC's descent) holds one at a time instead of all."""

    def __init__(self, stats: Statistics | None, spaces: Sequence[str]) -> None:
        for space in spaces:
            check_moments(stats, space)
        self.stats, self.spaces, self._known = stats, list(spaces), set(spaces)

    def __contains__(self, space: object) -> bool:  # Mapping's default would compute the value
        return space in self._known

    def __getitem__(self, space: str) -> Any:
        if space not in self._known:
            raise KeyError(space)
        return correlation(self.stats, space)

    def __iter__(self) -> Iterator[str]:
        return iter(self.spaces)

    def __len__(self) -> int:
        return len(self.spaces)


def correlation(stats: Statistics | None, space: str, eps: float = 1e-8) -> Any:
    """The N·n × N·n feature correlation at ``space`` (a clear error when it was not gathered), with
    exact ties broken by scale: ``corr − 1e-9·|log σ_a − log σ_b|``.

    Why: with few samples at a merge point (a squeeze-excitation layer sees one per image) ReLU
    features of one model that fire on the same single image are exactly proportional, so they tie
    at correlation 1 with each other and with each other's partners, and a matching on correlation
    alone picks between them by index: a permuted copy of the model then does not come back
    (torchvision's RegNet-Y at 16 images: 5e-3). Proportional features differ in scale, their true
    partners do not; the term moves no choice whose correlations differ by more than ~1e-8."""
    check_moments(stats, space)
    moments = stats.moments[space]
    corr = moments.correlation(eps)
    variance = moments.outer.diagonal() / moments.count - moments.mean**2  # covariance's diagonal only
    log_std = variance.clamp_min(eps * eps).log() / 2
    return corr - SCALE_TIE_BREAK * (log_std[:, None] - log_std[None, :]).abs()
