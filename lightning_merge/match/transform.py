"""What every matcher returns: per merge point, a merge matrix M and an unmerge matrix U.

For N sources with ``n`` features each at a space, ``merge`` is (m, N·n): row j averages the source
features fused into merged feature j; ``unmerge`` is (N·n, m): it copies merged feature j back to
every source feature it came from. Column block i of M (``merge_block(i)``) acts on model i's
features, row block i of U (``unmerge_block(i)``) recovers model i's features.

Every matcher here makes a hard assignment (each source feature goes to one merged feature), so a
transform built by :func:`from_assignment` keeps only the assignment (N·n integers) and forms M, U
or a block of them when asked, never caching them. Held densely, M and U of a ViT-B's twelve
3072-wide MLP spaces took 3.6 GB per set of transforms (a twin check, then every method's); the
blocks the weight application asks for are (m × n), one at a time. A transform given dense M and U
(any linear merge) keeps them as given.
"""

from __future__ import annotations

import torch


class SpaceTransform:
    """M (m, N·n) and U (N·n, m) of one merge point: given densely, or formed on demand from a hard
    assignment (:func:`from_assignment`)."""

    def __init__(
        self,
        merge: torch.Tensor | None = None,
        unmerge: torch.Tensor | None = None,
        num_models: int = 1,
        *,
        assignment: torch.Tensor | None = None,
        width: int | None = None,
    ) -> None:
        self.num_models = num_models
        self._merge, self._unmerge, self._assign = merge, unmerge, assignment
        if assignment is not None:
            if merge is not None or unmerge is not None or width is None:
                raise ValueError("give either dense merge and unmerge, or an assignment and its width")
            self._width, total = width, assignment.numel()
            self._scale = 1.0 / _counts(assignment, width).to(torch.float64)
        elif merge is None or unmerge is None:
            raise ValueError("give either dense merge and unmerge, or an assignment and its width")
        else:
            self._width, total = merge.shape
            if unmerge.shape != (total, self._width):
                want = (total, self._width)
                raise ValueError(f"unmerge has shape {tuple(unmerge.shape)}, expected {want} to match merge")
        if total % num_models:
            raise ValueError(f"merge width {total} is not divisible by {num_models} models")

    @property
    def width(self) -> int:
        """Merged width m."""
        return self._width

    @property
    def source_width(self) -> int:
        """Per-model width n."""
        return self.total // self.num_models

    @property
    def total(self) -> int:
        """N·n: every model's features."""
        return self._assign.numel() if self._assign is not None else self._merge.shape[1]

    @property
    def assignment(self) -> torch.Tensor | None:
        """The merged feature of every source feature (N·n,), or None for a dense transform."""
        return self._assign

    @property
    def merge(self) -> torch.Tensor:
        """M (m, N·n), float64."""
        if self._assign is None:
            return self._merge
        return torch.cat([self.merge_block(i) for i in range(self.num_models)], 1)

    @property
    def unmerge(self) -> torch.Tensor:
        """U (N·n, m), float64."""
        if self._assign is None:
            return self._unmerge
        return torch.cat([self.unmerge_block(i) for i in range(self.num_models)], 0)

    def merge_block(self, i: int) -> torch.Tensor:
        """Model i's columns of M: (m, n)."""
        n = self.source_width
        if self._assign is None:
            return self._merge[:, i * n : (i + 1) * n]
        a = self._assign[i * n : (i + 1) * n]
        out = torch.zeros(self._width, n, dtype=torch.float64, device=a.device)
        out[a, torch.arange(n, device=a.device)] = self._scale[a]
        return out

    def unmerge_block(self, i: int) -> torch.Tensor:
        """Model i's rows of U: (n, m)."""
        n = self.source_width
        if self._assign is None:
            return self._unmerge[i * n : (i + 1) * n]
        a = self._assign[i * n : (i + 1) * n]
        out = torch.zeros(n, self._width, dtype=torch.float64, device=a.device)
        out[torch.arange(n, device=a.device), a] = 1.0
        return out

    def columns(self, role: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For an assignment, each model's (m, n) operator on a weight axis as its one entry per
        column: (rows, vals), both (N, n). ``role="out"``: M_i (vals 1/count); ``"in"``: U_iᵀ (vals 1).
        None for a dense transform. Applying it is an index-add, not an (m × n) product."""
        if self._assign is None:
            return None
        rows = self._assign.reshape(self.num_models, -1)
        vals = (
            self._scale[rows]
            if role == "out"
            else torch.ones(rows.shape, dtype=torch.float64, device=rows.device)
        )
        return rows, vals

    def __repr__(self) -> str:
        kind = "assignment" if self._assign is not None else "dense"
        return f"SpaceTransform({kind}, width={self.width}, {self.num_models}×{self.source_width})"


def from_assignment(assign: torch.Tensor, width: int, num_models: int) -> SpaceTransform:
    """The transform of a hard assignment: ``assign[k]`` = merged feature of source feature k.

    M averages the source features sharing a merged feature; U copies the merged feature back. Only
    the assignment is kept (see the module docstring); M and U are float64 on ``assign``'s device."""
    assign = torch.as_tensor(assign, dtype=torch.long)
    return SpaceTransform(num_models=num_models, assignment=assign, width=width)


def _counts(assign: torch.Tensor, width: int) -> torch.Tensor:
    """Source features per merged feature; every merged feature must receive one."""
    if assign.dtype != torch.long or assign.dim() != 1:
        raise ValueError(
            f"an assignment is a 1-d long tensor, got {assign.dtype} of shape {tuple(assign.shape)}"
        )
    if assign.numel() and (int(assign.min()) < 0 or int(assign.max()) >= width):
        raise ValueError(
            f"assignment values must lie in [0, {width}), got {int(assign.min())}..{int(assign.max())}"
        )
    counts = torch.bincount(assign, minlength=width)
    if bool((counts == 0).any()):
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"merged features {empty[:8]} receive no source feature")
    return counts
