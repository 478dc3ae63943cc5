"""Literal, slow transcription of ZipIt!'s greedy rule, the oracle for the fast matcher.

Like the published loop it keeps the similarity matrix of the *current* features only, takes the
flat argmax of the whole matrix at every step, writes the fused row/column, deletes the absorbed
feature's row and column (rebuilding the matrix) and re-masks a model's block when its same-model
budget is spent. The rule itself (α, β, tie-breaking) is documented in lightning_merge.match.zip.
"""

from __future__ import annotations

import torch

NEG = float("-inf")


def zipit_reference(
    sim: torch.Tensor, num_models: int, target_width: int, alpha: float, beta: float
) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """Return the fusions (lowest member of each part) and the merged index of every feature."""
    total = sim.shape[0]
    n = total // num_models
    s = sim.to(torch.float64).clone()
    s.fill_diagonal_(NEG)
    members = [[k] for k in range(total)]  # current features, ordered by lowest member
    origin = [k // n for k in range(total)]
    contains = [1 << (k // n) for k in range(total)]
    budget = [int(((total - target_width) // num_models) * beta + 1e-4)] * num_models
    if budget[0] <= 0:
        for i in range(num_models):
            s[i * n : (i + 1) * n, i * n : (i + 1) * n] = NEG
    fusions = []
    while len(members) > target_width:
        count = len(members)
        flat = int(s.reshape(-1).argmax())
        row, col = divmod(flat, count)
        if s[row, col] == NEG:
            raise ValueError("no allowed pair left")
        lo, hi = min(row, col), max(row, col)
        new = torch.minimum(s[lo], s[hi])
        if alpha > 0:
            new = new * alpha
        else:
            both = contains[lo] | contains[hi]
            clash = torch.tensor([(c & both) != 0 for c in contains])
            new[clash] = NEG
        new[lo] = NEG
        s[lo, :] = new
        s[:, lo] = new
        keep = torch.tensor([k for k in range(count) if k != hi])
        s = s[keep][:, keep]
        fusions.append((members[lo][0], members[hi][0]))
        same = origin[lo] == origin[hi]
        members[lo] = sorted(members[lo] + members[hi])
        contains[lo] |= contains[hi]
        del members[hi], origin[hi], contains[hi]
        if same:
            o = origin[lo]
            budget[o] -= 1
            if budget[o] <= 0:
                sel = torch.tensor([g == o for g in origin])
                s[sel[:, None] & sel[None, :]] = NEG
    assign = torch.empty(total, dtype=torch.long)
    for j, group in enumerate(members):
        assign[group] = j
    return fusions, assign
