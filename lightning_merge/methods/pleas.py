"""PLeaS: partial matching to a merged width between n and N·n, then a layer-wise least-squares refit.

1. Per merge point, fuse only the best-matching cross-model features and keep the rest apart: two
   models use PLeaS' partial Hungarian matching (the k = 2n − m best pairs); N > 2 models align
   every model to model 0 by Hungarian matching and fuse the N·n − m best-scoring of those
   (N − 1)·n pairs (:func:`partial_to_first`; equal to the two-model rule up to feature order,
   always feasible for m in [n, N·n], and Permute at m = n).
2. Re-fit every Linear/Conv2d by least squares. ``objective="published"`` (the paper's and official
   code's): per layer and independently, inputs built from the *sources' own* activations
   [ (x_A,m + x_B,m)/2 , x_A,u , x_B,u ], targets from their outputs the same way, the weights from
   one model's unmatched inputs to the other's unmatched outputs held at zero; solved in closed form
   from the ``joint_inputs`` statistics, no data pass
   (:func:`lightning_merge.apply.block_least_squares.refit_from_statistics`). At merged width 2n the
   result is the two sources side by side; at unmatched ratio r a layer has (1 + 2r − r²) of a source
   layer's non-zero weights, reported in the result's ``diagnostics["cost"]``.
   ``objective="propagated"`` (this library's earlier variant): a dense refit in forward order on
   the *merged* model's propagated inputs, reading the calibration loader
   (:func:`lightning_merge.apply.least_squares.least_squares_refit`).

PLeaS-free (the paper's data-free variant) is the same with statistics gathered on another data set:
``MergeDataModule(calibration=...)`` chooses what the statistics pass (and the propagated refit) read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_merge.apply.block_least_squares import refit_from_statistics
from lightning_merge.apply.least_squares import least_squares_refit
from lightning_merge.dataflow import check_max_batches
from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match._checks import check_similarity, check_target_width
from lightning_merge.match.budget import LayerCost, budget_unmatched
from lightning_merge.match.partial import match_partial
from lightning_merge.match.permute import group_hungarian, hungarian
from lightning_merge.match.transform import SpaceTransform, from_assignment
from lightning_merge.methods.transform_base import TransformMethod, Transforms, check_ratio, correlation
from lightning_merge.methods.zipit import resolve_widths
from lightning_merge.stats.container import Statistics

OBJECTIVES = ("published", "propagated")


def partial_to_first(
    corr: torch.Tensor, num_models: int, *, target_width: int, group_size: int = 1
) -> SpaceTransform:
    """N-model partial matching: Hungarian-align each model to model 0, fuse the best N·n − m pairs.

    Merged layout: model 0's n features (with the partners fused into them), then the unfused
    features of models 1, 2, … in their own order.
    """
    corr = check_similarity(corr, num_models)
    n = corr.shape[0] // num_models
    check_target_width(target_width, n, num_models)
    if group_size > 1 and target_width != n:
        raise ValueError(
            f"partial matching fuses single features, which would split groups of {group_size}: "
            f"use target_width = n = {n} for this merge point (width 1 or a per-point entry in widths)"
        )
    rows = torch.arange(n, device=corr.device)
    perms = [group_hungarian(corr[:n, i * n : (i + 1) * n], group_size) for i in range(1, num_models)]
    scores = torch.stack([corr[rows, (i + 1) * n + p] for i, p in enumerate(perms)])  # (N-1, n)
    k = num_models * n - target_width
    order = torch.sort(-scores.flatten(), stable=True).indices
    fused = torch.zeros(scores.numel(), dtype=torch.bool, device=corr.device)
    fused[order[:k]] = True
    fused = fused.view(num_models - 1, n)
    assign = torch.empty(num_models * n, dtype=torch.long, device=corr.device)
    assign[:n] = rows
    nxt = n
    for i, p in enumerate(perms, start=1):
        assign[i * n + p[fused[i - 1]]] = rows[fused[i - 1]]
        rest = torch.sort(p[~fused[i - 1]]).values
        assign[i * n + rest] = nxt + torch.arange(rest.numel(), device=corr.device)
        nxt += rest.numel()
    return from_assignment(assign, target_width, num_models)


def _axis_space(graph: MergeGraph, param: str, axis: int) -> str | None:
    """The merge point on a weight axis (the first one when a concatenation joins several)."""
    for space in graph.spaces:
        if any(r.param == param and r.axis == axis for r in space.members):
            return space.name
    return None


def budget_widths(
    sources: Sequence[nn.Module], graph: MergeGraph, stats: Statistics | None, budget: float
) -> dict[str, int]:
    """Merged width per merge point from :func:`~lightning_merge.match.budget.budget_unmatched`.

    FLOPs per layer = weights × output positions (the rows the ``joint_inputs`` pass saw; the same
    samples for every layer). Objective weight of a merge point: 1 − the mean correlation of its
    Hungarian pairs, i.e. what merging its features loses (the official code reads per-layer weights
    from archived layer-wise experiments instead)."""
    if len(sources) != 2:
        raise ValueError(f"the PLeaS budget solver merges 2 models, got {len(sources)}")
    if stats is None or not stats.joint_inputs:
        raise ValueError("the PLeaS budget needs the 'joint_inputs' statistics (rows per layer)")
    layers = []
    for name, moments in stats.joint_inputs.items():
        weight = sources[0].get_submodule(name).weight
        flops = float(weight.numel()) * float(moments.count)
        param = f"{name}.weight"
        layers.append(LayerCost(flops, _axis_space(graph, param, 1), _axis_space(graph, param, 0)))
    sizes, weights = {}, {}
    for s in graph.spaces:
        if s.group_size != 1:
            raise ValueError(f"the budget solver fuses single features; merge point {s.name!r} has groups")
        corr = correlation(stats, s.name)
        n = s.size
        pairs = corr[torch.arange(n, device=corr.device), n + hungarian(corr[:n, n:])]
        sizes[s.name], weights[s.name] = n, float(1.0 - pairs.mean())
    unmatched = budget_unmatched(layers, sizes, weights, budget)
    return {k: sizes[k] + u for k, u in unmatched.items()}


def _check_budget(budget: float | None, width: float, widths: dict[str, int] | None) -> None:
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 1.0 <= budget <= 2.0:
        raise ValueError(f"budget must be a number in [1, 2] (FLOPs relative to one source), got {budget!r}")
    if width != 1.0 or widths:
        raise ValueError("give either budget (per-layer widths from the solver) or width/widths, not both")


def cost_summary(cost: Mapping[str, tuple[int, int, float]]) -> dict[str, Any]:
    """PLeaS' cost of the refitted layers relative to one source: non-zero (allowed) weights, and
    FLOPs = weights × output positions (the rows a layer saw per sample, the same sample count for all)."""
    if not cost:
        return {"layers": {}, "params": None, "flops": None}
    nnz = sum(c[0] for c in cost.values())
    src = sum(c[1] for c in cost.values())
    flops = sum(c[0] * c[2] for c in cost.values()) / sum(c[1] * c[2] for c in cost.values())
    return {"layers": {k: c[0] / c[1] for k, c in cost.items()}, "params": nnz / src, "flops": flops}


class PLeaSMerge(TransformMethod):
    """``width`` = m/n in [1, N] (or per-merge-point ``widths``, or widths from the budget solver under
    ``budget`` = FLOPs relative to one source, in [1, 2]); ``objective``: "published" (per-layer
    fit on the sources' own activations, from statistics, structural zero blocks) or "propagated"
    (dense forward-order refit on the merged model's inputs); ``ridge`` is the relative Tikhonov term
    of the solve (0: pseudo-inverse, published objective only); ``max_batches`` caps the batches the
    propagated refit reads; ``refit=False`` skips step 2."""

    name = "pleas"

    def __init__(
        self,
        *,
        width: float = 1.0,
        widths: dict[str, int] | None = None,
        budget: float | None = None,
        objective: str = "published",
        ridge: float = 1e-4,
        max_batches: int | None = None,
        refit: bool = True,
        stop_at: str | float | None = None,
    ) -> None:
        super().__init__(stop_at=stop_at)
        check_ratio(width, "width")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
            raise ValueError(f"ridge must be a number >= 0, got {ridge!r}")
        if objective == "propagated" and ridge == 0:
            raise ValueError("ridge=0 (pseudo-inverse) is for objective='published'; give ridge > 0")
        check_max_batches(max_batches)
        _check_budget(budget, width, widths)
        self.width, self.widths, self.objective, self.ridge = float(width), widths, objective, float(ridge)
        self.budget = None if budget is None else float(budget)
        self.max_batches, self.refit = max_batches, refit

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        """The published refit reads the sources' joint layer-input moments."""
        if (self.refit and self.objective == "published") or self.budget is not None:
            return frozenset({"moments", "joint_inputs"})
        return frozenset({"moments"})

    @property
    def needs_data(self) -> bool:  # type: ignore[override]
        """Only the propagated refit reads the calibration data."""
        return self.refit and self.objective == "propagated"

    def match(self, sources: Sequence[nn.Module], graph: MergeGraph, stats: Statistics | None) -> Transforms:
        num = len(sources)
        if self.budget is not None:
            widths = budget_widths(sources, graph, stats, self.budget)
        else:
            widths = resolve_widths(graph, num, self.width, self.widths)
        out = {}
        for s in graph.spaces:
            corr = correlation(stats, s.name)
            if num == 2 and s.group_size == 1:  # PLeaS' own two-model rule
                out[s.name] = match_partial(corr, num, target_width=widths[s.name])
            else:
                out[s.name] = partial_to_first(
                    corr, num, target_width=widths[s.name], group_size=s.group_size
                )
        return out

    def refine(
        self,
        merged: nn.Module,
        sources: Sequence[nn.Module],
        graph: MergeGraph,
        transforms: Mapping[str, SpaceTransform],
        data: Iterable[Any] | None,
        stats: Statistics | None = None,
    ) -> dict[str, Any]:
        """Step 2 on ``merged`` (the full model, or a partial zip's trunk), in place."""
        if not self.refit:
            return {}
        if self.objective == "published":
            self.check_stats(stats)
            assert stats is not None  # check_stats raised otherwise
            cost = refit_from_statistics(
                merged, sources, graph, transforms, stats.joint_inputs, ridge=self.ridge
            )
            return {"cost": cost_summary(cost)}
        if data is None:
            raise ValueError("pleas needs a data loader for its propagated refit (data=None given)")
        least_squares_refit(
            merged, sources, graph, transforms, data, ridge=self.ridge, max_batches=self.max_batches
        )
        return {}
