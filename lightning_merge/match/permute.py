"""Weight averaging (identity matching) and Permute: Hungarian alignment of every model to model 0.

Permute follows Git Re-Basin's activation matching as ZipIt!'s code runs it for N models: model 0
is the reference and every other model is aligned to it on the cross block of the correlation
matrix. With ``anchor="mean"`` model i is aligned to the sum of the correlation rows of the
features already aligned (models 0..i-1), i.e. to the running merged feature, which stops model 0's
idiosyncrasies from dominating when N > 2. Correlations are summed, not recomputed for the averaged
feature (exact only when the aligned features have equal variance): it is a matching score.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from lightning_merge.match._checks import check_group_size, check_num_models, check_similarity
from lightning_merge.match.transform import SpaceTransform, from_assignment


def hungarian(score: torch.Tensor) -> torch.Tensor:
    """Column matched to each row maximising the total score (square ``score``), on score's device."""
    rows, cols = linear_sum_assignment(score.detach().cpu().numpy(), maximize=True)
    out = np.empty(score.shape[0], dtype=np.int64)
    out[rows] = cols
    return torch.from_numpy(out).to(score.device)


def match_groups(score: torch.Tensor, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Match groups of ``group_size`` consecutive rows to groups of columns, as units.

    A pair of groups scores the mean of its best within-group assignment (MuDSC's group score).
    Returns ``group_cols`` (G,): the column group matched to row group a, and ``inner`` (G, G, g):
    ``inner[a, b, r]`` = column (within group b) matched to row r of group a.
    """
    g = score.shape[0] // group_size
    blocks = score.reshape(g, group_size, g, group_size).permute(0, 2, 1, 3).cpu().numpy()
    inner = np.empty((g, g, group_size), dtype=np.int64)
    group_score = np.empty((g, g))
    for a in range(g):
        for b in range(g):
            r, c = linear_sum_assignment(blocks[a, b], maximize=True)
            inner[a, b, r] = c
            group_score[a, b] = blocks[a, b][r, c].mean()
    _, group_cols = linear_sum_assignment(group_score, maximize=True)
    return group_cols, inner


def group_hungarian(score: torch.Tensor, group_size: int) -> torch.Tensor:
    """Hungarian that keeps groups of ``group_size`` consecutive features intact.

    Groups are matched as units first (see :func:`match_groups`), then features are matched
    within each matched pair of groups.
    """
    if group_size == 1:
        return hungarian(score)
    group_cols, inner = match_groups(score, group_size)
    rows = np.arange(group_cols.size)
    out = (group_cols[:, None] * group_size + inner[rows, group_cols]).reshape(-1)
    return torch.from_numpy(out).to(score.device)


def permutations_to_transform(perms: list[torch.Tensor], num_models: int) -> SpaceTransform:
    """``perms[i][k]`` = feature of model i matched to merged feature k (``perms[0]`` = identity)."""
    n = perms[0].numel()
    assign = torch.empty(num_models * n, dtype=torch.long, device=perms[0].device)
    k = torch.arange(n, device=perms[0].device)
    for i, p in enumerate(perms):
        assign[i * n + p] = k
    return from_assignment(assign, n, num_models)


def match_identity(n: int, num_models: int, *, device: torch.device | str | None = None) -> SpaceTransform:
    """Weight averaging: feature k of every model becomes merged feature k."""
    check_num_models(num_models)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n (features per model) must be a positive integer, got {n!r}")
    eye = torch.arange(n, device=device)
    return permutations_to_transform([eye] * num_models, num_models)


def match_permute(
    corr: torch.Tensor,
    num_models: int,
    *,
    group_size: int = 1,
    anchor: Literal["first", "mean"] = "first",
) -> SpaceTransform:
    """Permute every model onto model 0 by Hungarian matching on the cross-correlation blocks."""
    corr = check_similarity(corr, num_models)
    n = corr.shape[0] // num_models
    check_group_size(group_size, n)
    if anchor not in ("first", "mean"):
        raise ValueError(f"anchor must be 'first' or 'mean', got {anchor!r}")
    perms = [torch.arange(n, device=corr.device)]
    ref_rows = corr[:n]  # rows of the (running) merged features, columns over all N·n features
    for i in range(1, num_models):
        block = ref_rows[:, i * n : (i + 1) * n]
        p = group_hungarian(block, group_size)
        perms.append(p)
        if anchor == "mean":
            ref_rows = ref_rows + corr[i * n + p]
    return permutations_to_transform(perms, num_models)
