"""RegMean / MaTS / Fisher merging after alignment, for models from different initialisations.

The same-base mergers assume feature k of every model means the same thing; models trained from
different seeds break that. So: (1) a one-to-one aligner (Permute's activation matching or Git
Re-Basin weight matching) gives, per merge point, the matched feature of every model; (2) every
source is permuted into that common order (a functionally equivalent copy); (3) the merger's
statistics (Gram / Fisher / K-FAC) are gathered on the *aligned* copies over the calibration data;
(4) the merger combines the aligned copies as if they shared a base. With ``stop_at`` the merged
layers form the trunk of a partial zip and every source keeps its own tail.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from lightning_merge.graph.equivalence import permute_model
from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match.transform import SpaceTransform
from lightning_merge.methods.base import MergeMethod, get_method, register_method
from lightning_merge.methods.permute import PermuteMerge
from lightning_merge.methods.transform_base import TransformMethod, Transforms
from lightning_merge.methods.weight_matching import WeightMatchingMerge
from lightning_merge.stats.collect import collect_statistics
from lightning_merge.stats.container import Statistics

ALIGNERS: dict[str, type[TransformMethod]] = {"permute": PermuteMerge, "weight_matching": WeightMatchingMerge}
MERGERS = ("fisher", "mats", "regmean")
Align = Literal["permute", "weight_matching"]
Merger = Literal["regmean", "mats", "fisher"]


def alignment_permutations(
    transforms: Mapping[str, SpaceTransform], graph: MergeGraph, num_models: int
) -> list[dict[str, torch.Tensor]]:
    """Per model, per merge point: ``perm[k]`` = the model's feature that becomes merged feature k.

    This is :func:`~lightning_merge.graph.equivalence.permute_model`'s convention (new feature k =
    old feature ``perm[k]``). Both aligners keep model 0 in place, so the common order is model 0's.
    Raises when a transform is not a width-n one-to-one assignment (ZipIt!-style fusions are not).
    """
    perms: list[dict[str, torch.Tensor]] = [{} for _ in range(num_models)]
    for space in graph.spaces:
        if space.name not in transforms:
            raise KeyError(f"the aligner returned no transform for merge point {space.name!r}")
        t = transforms[space.name]
        if t.num_models != num_models or t.width != space.size or t.source_width != space.size:
            raise ValueError(
                f"merge point {space.name!r}: transform of width {t.width} for {t.num_models} models of "
                f"{t.source_width} features is not a one-to-one alignment of {num_models} models of "
                f"{space.size} features"
            )
        for i in range(num_models):
            perms[i][space.name] = _assignment(t.unmerge_block(i), space.name, i)
    return perms


def _assignment(block: torch.Tensor, space: str, model: int) -> torch.Tensor:
    """The permutation encoded by a 0/1 unmerge block U_i (n × n, one 1 per row and per column)."""
    ones = block == 1
    if not (
        bool((ones | (block == 0)).all())
        and bool((ones.sum(0) == 1).all())
        and bool((ones.sum(1) == 1).all())
    ):
        raise ValueError(
            f"merge point {space!r}: the unmerge block of model {model} is not a permutation matrix; "
            "the aligner must match features one to one"
        )
    return ones.to(torch.uint8).argmax(0).cpu()


def aligned_copies(
    sources: Sequence[nn.Module], graph: MergeGraph, transforms: Mapping[str, SpaceTransform]
) -> list[nn.Module]:
    """Functionally equivalent deep copies of ``sources``, every one in the merged feature order."""
    perms = alignment_permutations(transforms, graph, len(sources))
    return [permute_model(copy.deepcopy(s), graph, p) for s, p in zip(sources, perms, strict=True)]


def _check_kwargs(kwargs: object, label: str) -> dict[str, Any]:
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"{label} must be a mapping of keyword arguments, got {type(kwargs).__name__}")
    return dict(kwargs or {})


def _build(factory: Any, name: str, kwargs: Mapping[str, Any], label: str) -> Any:
    """Instantiate ``factory(**kwargs)``; its own validation errors are re-raised naming ``label``."""
    try:
        return factory(**dict(kwargs or {}))
    except (TypeError, ValueError) as err:
        raise type(err)(f"aligned: {label} for {name!r} are invalid: {err}") from err


@register_method("aligned")
class AlignedMerge(TransformMethod):
    """Align the sources one to one (``align``), then merge the aligned copies with a same-base
    ``merger`` whose statistics are gathered on them over the calibration data.

    Args:
        align: ``"permute"`` (activation matching on feature correlations: needs the ``moments``
            statistics pass) or ``"weight_matching"`` (from the weights alone).
        merger: ``"regmean"``, ``"mats"`` or ``"fisher"``; merged without a base, so MaTS starts from
            the average (``init="task_arithmetic"`` is rejected).
        merger_kwargs / align_kwargs: keyword arguments of the merger / aligner class
            (e.g. ``{"subspace": "regmean", "iterations": 100}`` for MaTS, ``{"max_iter": 50}``).
        max_batches: limit of the merger's statistics pass over the calibration loader.
        stop_at: partial zip: merged trunk up to this cut point, every source's own tail after it.
    """

    requires = frozenset({"moments"})
    needs_data = True

    def __init__(
        self,
        *,
        align: Align = "permute",
        merger: Merger = "regmean",
        merger_kwargs: dict[str, Any] | None = None,
        align_kwargs: dict[str, Any] | None = None,
        max_batches: int | None = None,
        stop_at: str | float | None = None,
    ) -> None:
        super().__init__(stop_at=stop_at)
        if align not in ALIGNERS:
            raise ValueError(f"unknown align {align!r}; valid: {sorted(ALIGNERS)}")
        if merger not in MERGERS:
            raise ValueError(
                f"unknown merger {merger!r}; valid: {list(MERGERS)} (the methods that need no shared base)"
            )
        if max_batches is not None and (
            isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
        ):
            raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
        merger_args = _check_kwargs(merger_kwargs, "merger_kwargs")
        align_args = _check_kwargs(align_kwargs, "align_kwargs")
        if "stop_at" in align_args:
            raise ValueError("align_kwargs must not set stop_at; give stop_at to the aligned method itself")
        init = merger_args.get("init", "average") if merger == "mats" else "average"
        if init != "average":
            raise ValueError(
                f"aligned: merger_kwargs for 'mats' set init={init!r}, but aligned models have no "
                "shared base: use init='average'"
            )
        self.aligner: TransformMethod = _build(ALIGNERS[align], align, align_args, "align_kwargs")
        self.merger_method: MergeMethod = _build(
            lambda **kw: get_method(merger, **kw), merger, merger_args, "merger_kwargs"
        )
        self.align, self.merger, self.max_batches = align, merger, max_batches
        self.merger_kwargs = None if merger_kwargs is None else dict(merger_kwargs)
        self.align_kwargs = None if align_kwargs is None else dict(align_kwargs)
        self.requires = frozenset(self.aligner.requires)

    def match(self, sources: Sequence[nn.Module], graph: MergeGraph, stats: Statistics | None) -> Transforms:
        return self.aligner.match(sources, graph, stats)

    def refine(
        self,
        merged: nn.Module,
        sources: Sequence[nn.Module],
        graph: MergeGraph,
        transforms: Mapping[str, SpaceTransform],
        data: Iterable[Any] | None,
    ) -> nn.Module:
        """Replace the averaged aligned weights in ``merged`` (the full model, or a partial zip's
        trunk, in place) by the merger's result on the aligned copies."""
        if data is None:
            raise ValueError(f"method {self.name!r} needs a data loader (data=None given)")
        aligned = aligned_copies(sources, graph, transforms)
        stats = collect_statistics(
            aligned,
            graph,
            data,
            requires=sorted(self.merger_method.requires),
            max_batches=self.max_batches,
            progress=False,
        )
        result = self.merger_method.merge(aligned, graph=graph, stats=stats, base=None, data=data)
        state = result.state_dict()
        merged.load_state_dict({k: state[k] for k in merged.state_dict()})
        return merged
