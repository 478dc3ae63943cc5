"""RegMean / MaTS / Fisher merging after alignment, for models from different initialisations.

The same-base mergers assume feature k of every model means the same thing; models trained from
different seeds break that. So: (1) a one-to-one aligner (``PermuteMerge``'s activation matching
or ``WeightMatchingMerge``, Git Re-Basin's weight matching) gives, per merge point, the matched
feature of every model; (2) every source is permuted into that common order (a functionally
equivalent copy); (3) the merger's statistics (Gram / Fisher / K-FAC) are gathered on the
*aligned* copies over the calibration data; (4) the merger combines the aligned copies as if they
shared a base. With ``stop_at`` the merged layers form the trunk of a partial zip and every source
keeps its own tail.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_merge.dataflow import check_max_batches
from lightning_merge.graph.equivalence import permute_model
from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match.transform import SpaceTransform
from lightning_merge.methods.permute import PermuteMerge
from lightning_merge.methods.regmean import RegMean
from lightning_merge.methods.same_base import SameBaseMethod
from lightning_merge.methods.transform_base import TransformMethod, Transforms
from lightning_merge.stats.collect import collect_statistics
from lightning_merge.stats.container import Statistics


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


def check_aligner(aligner: object) -> TransformMethod:
    """The aligner must be a matching method without a cut of its own (the aligned method has one)."""
    if not isinstance(aligner, TransformMethod):
        raise TypeError(
            f"aligner must be a matching method (a TransformMethod such as PermuteMerge() or "
            f"WeightMatchingMerge()), got {type(aligner).__name__}"
        )
    if aligner.stop_at is not None:
        raise ValueError(
            f"the aligner {type(aligner).__name__} sets stop_at={aligner.stop_at!r}; "
            "give stop_at to AlignedMerge itself"
        )
    return aligner


def check_merger(merger: object) -> SameBaseMethod:
    """The merger combines the aligned copies as if they shared a base, and there is none."""
    if not isinstance(merger, SameBaseMethod):
        raise TypeError(
            f"merger must be a same-base method (e.g. RegMean(), MaTS(), FisherMerge()), "
            f"got {type(merger).__name__}"
        )
    if merger.needs_base:
        raise ValueError(
            f"the merger {merger!r} needs a shared base model, but aligned models have none "
            "(MaTS: use init='average')"
        )
    return merger


class AlignedMerge(TransformMethod):
    """Align the sources one to one (``aligner``), then merge the aligned copies with a same-base
    ``merger`` whose statistics are gathered on them over the calibration data.

    Args:
        aligner: a one-to-one matching method: ``PermuteMerge()`` (activation matching on feature
            correlations: needs the ``moments`` statistics pass; the default) or
            ``WeightMatchingMerge()`` (from the weights alone); only its ``match`` is used.
        merger: a same-base method that needs no base: ``RegMean()`` (the default), ``MaTS()``
            (starting from the average), ``FisherMerge()``.
        max_batches: limit of the merger's statistics pass over the calibration loader.
        stop_at: partial zip: merged trunk up to this cut point, every source's own tail after it.

    The result's ``diagnostics["merger"]`` holds the merger's own diagnostics (MaTS' CG histories).
    """

    name = "aligned"
    needs_data = True

    def __init__(
        self,
        *,
        aligner: TransformMethod | None = None,
        merger: SameBaseMethod | None = None,
        max_batches: int | None = None,
        stop_at: str | float | None = None,
    ) -> None:
        super().__init__(stop_at=stop_at)
        check_max_batches(max_batches)
        self.aligner = check_aligner(PermuteMerge() if aligner is None else aligner)
        self.merger = check_merger(RegMean() if merger is None else merger)
        self.max_batches = max_batches

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        """The aligner's statistics (the merger's are gathered inside :meth:`merge`)."""
        return self.aligner.requires

    def match(self, sources: Sequence[nn.Module], graph: MergeGraph, stats: Statistics | None) -> Transforms:
        return self.aligner.match(sources, graph, stats)

    def refine(
        self,
        merged: nn.Module,
        sources: Sequence[nn.Module],
        graph: MergeGraph,
        transforms: Mapping[str, SpaceTransform],
        data: Iterable[Any] | None,
        stats: Statistics | None = None,
    ) -> dict[str, Any]:
        """Replace the averaged aligned weights in ``merged`` (the full model, or a partial zip's
        trunk, in place) by the merger's result on the aligned copies."""
        if data is None:
            raise ValueError(f"method {self.name!r} needs a data loader (data=None given)")
        aligned = aligned_copies(sources, graph, transforms)
        stats = collect_statistics(
            aligned,
            graph,
            data,
            requires=sorted(self.merger.requires),
            max_batches=self.max_batches,
            progress=False,
        )
        result = self.merger.merge(aligned, graph=graph, stats=stats, base=None, data=data)
        state = result.model.state_dict()
        merged.load_state_dict({k: state[k] for k in merged.state_dict()})
        return {"merger": dict(result.diagnostics)}
