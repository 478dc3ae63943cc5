"""MuDSC (Xu et al., CVPR 2024): match on a mix of activation and weight similarity.

At every merge point S = λ·S_act + (1 − λ)·S_weight, then ZipIt! or Hungarian (Permute) on S; with
groups (attention heads, GroupNorm groups) whole groups are aligned as units first.

S_weight compares, per feature, the concatenation of every tensor slice of the merge point: the
producing rows and the consuming columns (batch statistics excluded). A slice's *other* axes index
the features of neighbouring merge points, which differ between models; as in the official code
(zju-vipa/training_free_model_merging) they are first carried into the merged coordinates of those
points through their current matching: model i's tensor is multiplied by N·M_i along an axis that
consumes a point's features and by U_iᵀ along one that produces them (both reduce to the same
permutation for a one-to-one match). The measure is the Pearson correlation of those vectors (the
official default; cosine is the paper's equation).

Because every point's S_weight depends on its neighbours' matching, the matching is repeated by
coordinate descent (:func:`mudsc_descent`): start from the activation-only matching of every point,
then in rounds visit the points in a random order and rematch each on the mixed similarity with the
others fixed. A round's objective is the mean over points of the mean similarity of the pairs the
matcher took (ZipIt!: each fusion's score as the greedy saw it; Permute: each matched pair's). A
round that does not raise the best objective is undone; after ``patience`` (5) such rounds in a row,
or ``max_rounds`` (100) rounds, the best matching is returned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from lightning_merge.graph.spec import AxisRef, MergeGraph, Space
from lightning_merge.match._checks import (
    check_similarity,
    check_symmetric,
    check_target_width,
    check_unit_interval,
)
from lightning_merge.match._weights import (
    AxisMaps,
    StateDict,
    axes_by_param,
    check_state_dicts,
    mapped_member_rows,
    mapped_space_rows,
    space_rows,
    weight_members,
)
from lightning_merge.match.permute import match_permute
from lightning_merge.match.transform import SpaceTransform, from_assignment
from lightning_merge.match.zip import assignment_from_fusions, check_alpha_beta, match_zipit, zipit_fusions

Matcher = Literal["zipit", "permute"]
Measure = Literal["cosine", "correlation"]
NEG = float("-inf")


def check_measure(measure: str) -> None:
    if measure not in ("cosine", "correlation"):
        raise ValueError(f"measure must be 'cosine' or 'correlation', got {measure!r}")


def check_matcher(matcher: str) -> None:
    if matcher not in ("zipit", "permute"):
        raise ValueError(f"matcher must be 'zipit' or 'permute', got {matcher!r}")


def space_maps(t: SpaceTransform, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Model i's (consume, produce) maps into a merge point's merged coordinates: (N·M_i, U_iᵀ).

    Sparse: a hard matching has one entry per source feature, so mapping costs O(n·D), not O(m·n·D).
    """
    return (t.num_models * t.merge_block(i)).to_sparse(), t.unmerge_block(i).T.to_sparse()


def transform_maps(
    transforms: Mapping[str, SpaceTransform], i: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`space_maps` of model i for every merge point of ``transforms``."""
    return {name: space_maps(t, i) for name, t in transforms.items()}


def _check_transforms(transforms: Mapping[str, SpaceTransform], graph: MergeGraph, num_models: int) -> None:
    for name, t in transforms.items():
        size = graph.space(name).size
        if t.num_models != num_models or t.source_width != size:
            raise ValueError(
                f"transforms[{name!r}] is for {t.num_models} models of width {t.source_width}, "
                f"but there are {num_models} models and merge point {name!r} has {size} features"
            )


Gram = tuple[torch.Tensor, torch.Tensor, int]  # (R·Rᵀ, R·1, number of columns) of rows R


def rows_gram(rows: torch.Tensor) -> Gram:
    return rows @ rows.T, rows.sum(1), rows.shape[1]


def gram_similarity(parts: Sequence[Gram], measure: Measure) -> torch.Tensor:
    """Cosine (or, centred per row, Pearson) similarity of rows given as column blocks' Grams.

    The Gram of side-by-side blocks is the sum of theirs, so a block whose inputs did not change can
    be reused; centring is G − s·sᵀ/D with s the row sums over all D columns.
    """
    gram = sum(p[0] for p in parts)
    if measure == "correlation":
        sums = sum(p[1] for p in parts)
        gram = gram - torch.outer(sums, sums) / sum(p[2] for p in parts)
    norm = gram.diagonal().clamp_min(0).sqrt().clamp_min(1e-12)
    return gram / torch.outer(norm, norm)


def rows_similarity(rows: torch.Tensor, measure: Measure) -> torch.Tensor:
    """Cosine (or, centred per row, Pearson) similarity of every pair of rows."""
    return gram_similarity([rows_gram(rows)], measure)


def weight_similarity(
    state_dicts: Sequence[StateDict],
    graph: MergeGraph,
    space: str,
    *,
    measure: Measure = "correlation",
    roles: tuple[str, ...] = ("out", "in"),
    perms: Sequence[Mapping[str, torch.Tensor]] | None = None,
    transforms: Mapping[str, SpaceTransform] | None = None,
) -> torch.Tensor:
    """(N·n × N·n) similarity of the weight vectors of every model's features at ``space``.

    Other axes are aligned by one of: ``transforms`` (the current matching of other merge points,
    MuDSC's rule, see the module docstring) or ``perms[i][other_space]`` (model i's other axes in
    model 0's order, e.g. from weight matching); with neither they are compared as they are.
    """
    check_measure(measure)
    if perms is not None and transforms is not None:
        raise ValueError("give perms or transforms to align the other axes, not both")
    if perms is not None and len(perms) != len(state_dicts):
        raise ValueError(f"perms has {len(perms)} entries for {len(state_dicts)} models")
    check_state_dicts(state_dicts, graph)
    target = graph.space(space)
    index = axes_by_param(graph)
    if transforms is not None:
        _check_transforms(transforms, graph, len(state_dicts))
        maps = [transform_maps(transforms, i) for i in range(len(state_dicts))]
        return _mapped_similarity(state_dicts, index, target, maps, measure, roles)
    rows = [
        space_rows(sd, index, target, perms[i] if perms else {}, roles) for i, sd in enumerate(state_dicts)
    ]
    return rows_similarity(torch.cat(rows), measure)


def _mapped_similarity(
    state_dicts: Sequence[StateDict],
    index: dict,
    space: Space,
    maps: Sequence[AxisMaps],
    measure: Measure,
    roles: tuple[str, ...] = ("out", "in"),
) -> torch.Tensor:
    rows = [mapped_space_rows(sd, index, space, maps[i], roles) for i, sd in enumerate(state_dicts)]
    return rows_similarity(torch.cat(rows), measure)


def member_neighbours(index: dict, member: AxisRef) -> list[str]:
    """Merge points on the other axes of ``member``'s tensor."""
    return sorted({s.name for s, ref in index[member.param] if ref.axis != member.axis})


def fusion_scores(sim: torch.Tensor, fusions: Sequence[tuple[int, int]], alpha: float) -> np.ndarray:
    """The score of every ZipIt! fusion as the greedy saw it, replayed on a copy of ``sim``.

    A fused feature's row is the minimum of its parts' (times α when α > 0). The zip's masks (spent
    budgets, α ≤ 0) only exclude pairs, so the pairs it took have the same scores here.
    """
    s = sim.detach().cpu().numpy().copy()
    np.fill_diagonal(s, NEG)
    out = np.empty(len(fusions))
    for k, (lo, hi) in enumerate(fusions):
        out[k] = s[lo, hi]
        new = np.minimum(s[lo], s[hi])
        if alpha > 0:
            new *= alpha
        s[hi] = NEG
        s[:, hi] = NEG
        s[lo] = new
        s[:, lo] = new
    return out


def _zip_scored(
    sim: torch.Tensor, num_models: int, group_size: int, width: int, alpha: float, beta: float
) -> tuple[SpaceTransform, float]:
    """ZipIt! and the mean score of its fusions (0 when it makes none, as the official code)."""
    total = sim.shape[0]
    if group_size == 1:
        sim = check_symmetric(check_similarity(sim, num_models))
        check_target_width(width, total // num_models, num_models)
        check_alpha_beta(alpha, beta)
        fusions = zipit_fusions(sim, num_models, width, alpha, beta)
        t = from_assignment(assignment_from_fusions(fusions, total, sim.device), width, num_models)
        scores = fusion_scores(sim, fusions, alpha)
        return t, float(scores.mean()) if scores.size else 0.0
    t = match_zipit(sim, num_models, alpha=alpha, beta=beta, target_width=width, group_size=group_size)
    # every merged group holds one aligned tuple of source groups, zipped alone: replay each tuple
    sim = check_symmetric(sim.to(torch.float64))
    groups = total // num_models // group_size
    per_group = width // groups
    scores = []
    for g in range(groups):
        members = _fed_into(t, g * per_group, (g + 1) * per_group)
        idx = torch.nonzero(members).flatten()
        sub = sim[idx][:, idx]
        scores.append(fusion_scores(sub, zipit_fusions(sub, num_models, per_group, alpha, beta), alpha))
    flat = np.concatenate(scores)
    return t, float(flat.mean()) if flat.size else 0.0


def _fed_into(t: SpaceTransform, lo: int, hi: int) -> torch.Tensor:
    """Which source features go to merged features [lo, hi) (read from the assignment when there is one)."""
    a = t.assignment
    return (a >= lo) & (a < hi) if a is not None else t.unmerge[:, lo:hi].sum(1) > 0


def _permute_score(sim: torch.Tensor, t: SpaceTransform) -> float:
    """Mean similarity of each model's matched features to model 0's (merged feature k = model 0's k)."""
    n = t.source_width
    k = torch.arange(n, device=sim.device)
    cols = [i * n + t.unmerge_block(i).argmax(0) for i in range(1, t.num_models)]
    return float(torch.stack([sim[k, c.to(sim.device)] for c in cols]).mean())


def match_scored(
    sim: torch.Tensor,
    num_models: int,
    *,
    matcher: Matcher = "zipit",
    group_size: int = 1,
    alpha: float = 0.5,
    beta: float = 1.0,
    target_width: int | None = None,
) -> tuple[SpaceTransform, float]:
    """Match on ``sim`` and return the transform with its score (the descent's objective term)."""
    check_matcher(matcher)
    sim = check_similarity(sim, num_models, name="sim")
    if matcher == "permute":
        t = match_permute(sim, num_models, group_size=group_size)
        return t, _permute_score(sim, t)
    width = sim.shape[0] // num_models if target_width is None else target_width
    return _zip_scored(sim, num_models, group_size, width, alpha, beta)


def match_mudsc(
    act_corr: torch.Tensor,
    weight_sim: torch.Tensor,
    num_models: int,
    *,
    lam: float = 0.5,
    matcher: Matcher = "zipit",
    group_size: int = 1,
    **zipit_kwargs: float | int | None,
) -> SpaceTransform:
    """One matching on λ·act_corr + (1 − λ)·weight_sim with ZipIt! (``alpha``, ``beta``,
    ``target_width`` as keywords) or Permute; ``group_size > 1`` keeps groups intact."""
    check_unit_interval(lam, "lam")
    check_matcher(matcher)
    act = check_similarity(act_corr, num_models, name="act_corr")
    weight = check_similarity(weight_sim, num_models, name="weight_sim").to(act.device)
    if act.shape != weight.shape:
        raise ValueError(
            f"act_corr {tuple(act.shape)} and weight_sim {tuple(weight.shape)} must have the same shape"
        )
    sim = lam * act + (1.0 - lam) * weight
    if matcher == "zipit":
        return match_zipit(sim, num_models, group_size=group_size, **zipit_kwargs)
    if zipit_kwargs:
        raise ValueError(f"matcher='permute' takes no ZipIt! options, got {sorted(zipit_kwargs)}")
    return match_permute(sim, num_models, group_size=group_size)


@dataclass
class DescentResult:
    """The best matching found, its objective, and the objective of every round run."""

    transforms: dict[str, SpaceTransform]
    objective: float
    history: list[float] = field(default_factory=list)

    @property
    def rounds(self) -> int:
        return len(self.history)


def check_descent(max_rounds: int, patience: int, seed: int) -> None:
    for name, value, lo in (("max_rounds", max_rounds, 1), ("patience", patience, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


class _Activations:
    """Each merge point's checked activation correlation, read from ``act_corr`` on every visit.

    ``act_corr`` may compute its values when read (``MuDSCMerge`` passes such a mapping): holding
    every (N·n)² correlation for the whole descent doubled the moments' memory (EfficientNet-V2-M's
    MuDSC reached 12 GB), while recomputing one per visit costs about what mixing it with the weight
    similarity already does."""

    def __init__(self, act_corr: Mapping[str, torch.Tensor], graph: MergeGraph, num: int) -> None:
        missing = [s.name for s in graph.spaces if s.name not in act_corr]
        if missing:
            raise KeyError(f"act_corr has no activation correlation for merge points {missing}")
        self.act_corr, self.graph, self.num = act_corr, graph, num

    def __getitem__(self, name: str) -> torch.Tensor:
        size = self.graph.space(name).size
        act = check_similarity(self.act_corr[name], self.num, name=f"act_corr[{name!r}]")
        if act.shape[0] != self.num * size:
            raise ValueError(
                f"act_corr[{name!r}] is {tuple(act.shape)}, expected N·n = {self.num * size} rows"
            )
        return act


def neighbours(graph: MergeGraph, index: dict) -> dict[str, set[str]]:
    """Merge points whose features index another axis of a tensor of each merge point."""
    out: dict[str, set[str]] = {}
    for space in graph.spaces:
        out[space.name] = {
            other_space.name
            for member in space.members
            for other_space, other in index[member.param]
            if other.axis != member.axis
        }
    return out


def same_transform(a: SpaceTransform, b: SpaceTransform) -> bool:
    """Equal M and U (compared through the assignments when both have one: no dense M or U formed)."""
    if a is b:
        return True
    if a.assignment is not None and b.assignment is not None:
        return a.width == b.width and a.num_models == b.num_models and torch.equal(a.assignment, b.assignment)
    return torch.equal(a.unmerge, b.unmerge) and torch.equal(a.merge, b.merge)


class _Descent:
    """One run of the coordinate descent; rematching a point whose neighbours have not changed since
    its last visit reuses that visit's result (same similarity, same deterministic matcher)."""

    def __init__(
        self, state_dicts: Sequence[StateDict], graph: MergeGraph, acts: _Activations, solve: Callable
    ) -> None:
        self.graph, self.acts, self.solve, self.num = graph, acts, solve, len(state_dicts)
        self.index = axes_by_param(graph)
        self.sds = [
            {k: v.detach().to(torch.float64) for k, v in sd.items() if k in self.index} for sd in state_dicts
        ]
        self.near = neighbours(graph, self.index)
        self.memo: dict[str, tuple[dict[str, SpaceTransform], SpaceTransform, float]] = {}
        self.parts: dict[tuple[str, int], tuple[dict[str, SpaceTransform], Gram | torch.Tensor]] = {}

    def member_part(
        self, space: Space, j: int, member: AxisRef, current: dict[str, SpaceTransform]
    ) -> Gram | torch.Tensor:
        """One member's mapped slices (all models stacked), reused while its neighbours hold.

        Kept as its Gram when that is smaller than the rows (D ≥ N·n columns), else as the rows: the
        (N·n)² Gram of every member of every merge point is what OOM-killed EfficientNet-B5 (19 GiB
        of Grams for a 30 M-parameter model; its 1×1 convolutions and BatchNorm vectors have few
        columns, so their rows take 0.6 GiB in all)."""
        near = member_neighbours(self.index, member)
        seen = self.parts.get((space.name, j))
        if seen is not None and all(same_transform(seen[0][nb], current[nb]) for nb in near):
            return seen[1]
        rows = torch.cat(
            [
                mapped_member_rows(
                    sd, self.index, space, member, {nb: space_maps(current[nb], i) for nb in near}
                )
                for i, sd in enumerate(self.sds)
            ]
        )
        part = rows if rows.shape[1] < rows.shape[0] else rows_gram(rows)
        self.parts[(space.name, j)] = ({nb: current[nb] for nb in near}, part)
        return part

    def space_grams(self, space: Space, current: dict[str, SpaceTransform]) -> list[Gram]:
        """The members' Grams: the cached ones, and one for all members kept as rows side by side."""
        parts = [self.member_part(space, j, m, current) for j, m in enumerate(weight_members(space))]
        grams = [p for p in parts if not isinstance(p, torch.Tensor)]
        rows = [p for p in parts if isinstance(p, torch.Tensor)]
        return grams + [rows_gram(torch.cat(rows, 1))] if rows else grams

    def rematch(
        self, space: Space, current: dict[str, SpaceTransform], lam: float, measure: Measure
    ) -> float:
        seen = self.memo.get(space.name)
        if seen is not None and all(same_transform(seen[0][nb], current[nb]) for nb in self.near[space.name]):
            current[space.name] = seen[1]
            return seen[2]
        act = self.acts[space.name]
        wsim = gram_similarity(self.space_grams(space, current), measure).to(act.device)
        t, score = self.solve(space, lam * act + (1.0 - lam) * wsim)
        if same_transform(t, current[space.name]):
            t = current[space.name]  # keep the object: later visits compare by identity first
        current[space.name] = t
        self.memo[space.name] = ({nb: current[nb] for nb in self.near[space.name]}, t, score)
        return score

    def run(
        self, current: dict, lam: float, measure: Measure, max_rounds: int, patience: int, seed: int
    ) -> DescentResult:
        gen = torch.Generator().manual_seed(seed)
        best: dict[str, SpaceTransform] | None = None
        best_obj, stale, history = NEG, 0, []
        for _ in range(max_rounds):
            order = torch.randperm(len(self.graph.spaces), generator=gen).tolist()
            scores = [self.rematch(self.graph.spaces[k], current, lam, measure) for k in order]
            history.append(float(np.mean(scores)))
            if best is not None and history[-1] <= best_obj:
                stale += 1
                if stale >= patience:
                    break
                current = dict(best)  # undo the round; the next one visits in another order
            else:
                stale, best, best_obj = 0, dict(current), history[-1]
        assert best is not None
        return DescentResult(best, best_obj, history)


def mudsc_descent(
    state_dicts: Sequence[StateDict],
    graph: MergeGraph,
    act_corr: Mapping[str, torch.Tensor],
    *,
    lam: float = 0.5,
    matcher: Matcher = "zipit",
    widths: Mapping[str, int] | None = None,
    alpha: float = 0.5,
    beta: float = 1.0,
    measure: Measure = "correlation",
    max_rounds: int = 100,
    patience: int = 5,
    seed: int = 0,
) -> DescentResult:
    """MuDSC's coordinate descent over all merge points (see the module docstring).

    ``act_corr[name]``: the N·n × N·n activation correlation of each merge point; ``widths[name]``
    the merged width for ZipIt! (default n). ``seed`` fixes the visiting order of every round.
    """
    check_unit_interval(lam, "lam")
    check_matcher(matcher)
    check_measure(measure)
    check_descent(max_rounds, patience, seed)
    num = len(state_dicts)
    check_state_dicts(state_dicts, graph)
    acts = _Activations(act_corr, graph, num)
    widths = dict(widths or {})

    def solve(space: Space, sim: torch.Tensor) -> tuple[SpaceTransform, float]:
        kw = (
            {}
            if matcher == "permute"
            else {"alpha": alpha, "beta": beta, "target_width": widths.get(space.name)}
        )
        return match_scored(sim, num, matcher=matcher, group_size=space.group_size, **kw)

    current = {s.name: solve(s, acts[s.name])[0] for s in graph.spaces}
    if lam == 1.0:  # the weights carry no weight: the activation matching is final
        return DescentResult(current, math.nan)
    return _Descent(state_dicts, graph, acts, solve).run(current, lam, measure, max_rounds, patience, seed)
