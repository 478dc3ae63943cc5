"""What every matcher returns: per merge point, a merge matrix M and an unmerge matrix U.

For N sources with ``n`` features each at a space, ``merge`` is (m, N·n): row j averages the source
features fused into merged feature j; ``unmerge`` is (N·n, m): it copies merged feature j back to
every source feature it came from. Column block i of M (``merge_block(i)``) acts on model i's
features, row block i of U (``unmerge_block(i)``) recovers model i's features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SpaceTransform:
    merge: torch.Tensor  # (m, N*n)
    unmerge: torch.Tensor  # (N*n, m)
    num_models: int

    def __post_init__(self) -> None:
        m, total = self.merge.shape
        if self.unmerge.shape != (total, m):
            raise ValueError(
                f"unmerge has shape {tuple(self.unmerge.shape)}, expected {(total, m)} to match merge"
            )
        if total % self.num_models:
            raise ValueError(f"merge width {total} is not divisible by {self.num_models} models")

    @property
    def width(self) -> int:
        """Merged width m."""
        return self.merge.shape[0]

    @property
    def source_width(self) -> int:
        """Per-model width n."""
        return self.merge.shape[1] // self.num_models

    def merge_block(self, i: int) -> torch.Tensor:
        n = self.source_width
        return self.merge[:, i * n : (i + 1) * n]

    def unmerge_block(self, i: int) -> torch.Tensor:
        n = self.source_width
        return self.unmerge[i * n : (i + 1) * n]


def from_assignment(assign: torch.Tensor, width: int, num_models: int) -> SpaceTransform:
    """Build M and U from a hard assignment: ``assign[k]`` = merged feature of source feature k.

    M averages the source features sharing a merged feature; U copies the merged feature back.
    Both are float64 on ``assign``'s device.
    """
    total = assign.numel()
    unmerge = torch.zeros(total, width, dtype=torch.float64, device=assign.device)
    unmerge[torch.arange(total, device=assign.device), assign] = 1.0
    counts = unmerge.sum(0)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"merged features {empty[:8]} receive no source feature")
    merge = (unmerge / counts).T.contiguous()
    return SpaceTransform(merge=merge, unmerge=unmerge, num_models=num_models)
