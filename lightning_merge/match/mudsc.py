"""MuDSC (Xu et al., 2024): match on a mix of activation and weight similarity.

S = λ·S_act + (1 − λ)·S_weight, then ZipIt! or Hungarian on S; with groups (attention heads,
GroupNorm groups) whole groups are matched as units first, then features inside matched groups.
S_weight compares, per feature, the concatenated slices of every tensor of the merge point (the
official code uses both the producing and the consuming weights, batch statistics excluded), with
other axes optionally aligned by known permutations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match._checks import check_similarity, check_unit_interval
from lightning_merge.match._weights import StateDict, axes_by_param, check_state_dicts, space_rows
from lightning_merge.match.permute import match_permute
from lightning_merge.match.transform import SpaceTransform
from lightning_merge.match.zip import match_zipit


def weight_similarity(
    state_dicts: Sequence[StateDict],
    graph: MergeGraph,
    space: str,
    *,
    measure: Literal["cosine", "correlation"] = "cosine",
    roles: tuple[str, ...] = ("out", "in"),
    perms: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """(N·n × N·n) similarity of the weight vectors of every model's features at ``space``.

    ``measure="cosine"`` is the paper's; ``"correlation"`` (Pearson over the vector) is the
    official code's default. ``perms[i][other_space]`` (e.g. from weight matching) expresses model
    i's other axes in model 0's order before comparing.
    """
    if measure not in ("cosine", "correlation"):
        raise ValueError(f"measure must be 'cosine' or 'correlation', got {measure!r}")
    if perms is not None and len(perms) != len(state_dicts):
        raise ValueError(f"perms has {len(perms)} entries for {len(state_dicts)} models")
    check_state_dicts(state_dicts, graph)
    target = graph.space(space)
    index = axes_by_param(graph)
    rows = torch.cat(
        [
            space_rows(sd, index, target, perms[i] if perms is not None else {}, roles)
            for i, sd in enumerate(state_dicts)
        ]
    )
    if measure == "correlation":
        rows = rows - rows.mean(dim=1, keepdim=True)
    rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return rows @ rows.T


def match_mudsc(
    act_corr: torch.Tensor,
    weight_sim: torch.Tensor,
    num_models: int,
    *,
    lam: float = 0.5,
    matcher: Literal["zipit", "permute"] = "zipit",
    group_size: int = 1,
    **zipit_kwargs: float | int | None,
) -> SpaceTransform:
    """Match on λ·act_corr + (1 − λ)·weight_sim with ZipIt! (``alpha``, ``beta``,
    ``target_width`` as keywords) or Permute; ``group_size > 1`` keeps groups intact."""
    check_unit_interval(lam, "lam")
    act = check_similarity(act_corr, num_models, name="act_corr")
    weight = check_similarity(weight_sim, num_models, name="weight_sim").to(act.device)
    if act.shape != weight.shape:
        raise ValueError(
            f"act_corr {tuple(act.shape)} and weight_sim {tuple(weight.shape)} must have the same shape"
        )
    sim = lam * act + (1.0 - lam) * weight
    if matcher == "zipit":
        return match_zipit(sim, num_models, group_size=group_size, **zipit_kwargs)
    if matcher == "permute":
        if zipit_kwargs:
            raise ValueError(f"matcher='permute' takes no ZipIt! options, got {sorted(zipit_kwargs)}")
        return match_permute(sim, num_models, group_size=group_size)
    raise ValueError(f"matcher must be 'zipit' or 'permute', got {matcher!r}")
