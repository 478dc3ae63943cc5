"""PLeaS partial matching: fuse only the k best Hungarian pairs, keep every other feature apart.

PLeaS (Nasery et al., SewoongLab/PLeaS-Merging ``get_blocks``) runs a full Hungarian matching of
model 1 to model 0, then keeps merged only the matched pairs whose score is in the top fraction and
leaves the rest as separate features of each model. For a merged width m in [n, 2n] that is
k = 2n − m fused pairs. Merged layout (as PLeaS builds its weights): the k fused pairs in model-0
order, then model 0's unfused features, then model 1's, each in their own order. So m = 2n gives
M = I (the exact ensemble's features) and m = n is exactly the Permute matching.
"""

from __future__ import annotations

import torch

from lightning_merge.match._checks import check_similarity, check_target_width
from lightning_merge.match.permute import hungarian
from lightning_merge.match.transform import SpaceTransform, from_assignment


def match_partial(corr: torch.Tensor, num_models: int = 2, *, target_width: int) -> SpaceTransform:
    """Partial permutation of model 1 onto model 0 with ``target_width`` merged features.

    Ties among equally scored pairs are broken towards the lower model-0 feature index.
    """
    corr = check_similarity(corr, num_models)
    if num_models != 2:
        raise ValueError(
            f"match_partial merges exactly 2 models (PLeaS's partial matching), got num_models={num_models}; "
            "use match_zipit(target_width=...) for N > 2"
        )
    n = corr.shape[0] // 2
    check_target_width(target_width, n, 2)
    k = 2 * n - target_width
    perm = hungarian(corr[:n, n:])  # model-1 feature matched to model-0 feature j
    rows = torch.arange(n, device=corr.device)
    score = corr[rows, n + perm]
    order = torch.sort(-score, stable=True).indices  # stable: lower index first among ties
    fused = torch.zeros(n, dtype=torch.bool, device=corr.device)
    fused[order[:k]] = True
    assign = torch.empty(2 * n, dtype=torch.long, device=corr.device)
    pair_rows = rows[fused]
    assign[pair_rows] = torch.arange(k, device=corr.device)
    assign[n + perm[fused]] = torch.arange(k, device=corr.device)
    rest0 = rows[~fused]
    assign[rest0] = k + torch.arange(n - k, device=corr.device)
    rest1 = torch.sort(perm[~fused]).values
    assign[n + rest1] = n + torch.arange(n - k, device=corr.device)
    return from_assignment(assign, target_width, 2)
