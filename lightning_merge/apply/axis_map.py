"""A merged weight axis as a sparse linear map of each source's axis (PLeaS' refit from statistics).

Merged position j of an axis is Σ_i (M_i)_{j,·} of model i's positions: a merge matrix has one or two
entries per row, so the map is kept as coordinate triplets per model. A dense (N, L', L) map cost
N·L'·L float64 values: 10 GB for a VGG classifier's 25088-wide input axis, where the triplets hold
about 2·25088 entries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from lightning_merge.apply.weights import _Member, plan_axis
from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match.transform import SpaceTransform


@dataclass(frozen=True)
class AxisMap:
    """Per model i, the non-zero entries (rows, cols, vals) of an (L', L) map; float64 values."""

    rows: tuple[torch.Tensor, ...]
    cols: tuple[torch.Tensor, ...]
    vals: tuple[torch.Tensor, ...]
    new_length: int
    length: int

    @property
    def num_models(self) -> int:
        return len(self.rows)

    def to(self, device: torch.device | str) -> AxisMap:
        move = lambda ts: tuple(t.to(device) for t in ts)  # noqa: E731
        return AxisMap(move(self.rows), move(self.cols), move(self.vals), self.new_length, self.length)

    def dense(self, i: int) -> torch.Tensor:
        """Model i's (L', L) map as a dense matrix (tests, small axes)."""
        out = torch.zeros(self.new_length, self.length, dtype=torch.float64, device=self.vals[i].device)
        out[self.rows[i], self.cols[i]] = self.vals[i]
        return out

    def owners(self) -> torch.Tensor:
        """(N, L') bool: which models feed each merged position."""
        out = torch.zeros(self.num_models, self.new_length, dtype=torch.bool, device=self.vals[0].device)
        for i in range(self.num_models):
            out[i, self.rows[i][self.vals[i] != 0]] = True
        return out

    def apply(self, i: int, x: torch.Tensor, k: int = 1) -> torch.Tensor:
        """(M_i ⊗ I_k) x for x of shape (L·k, …) (row c·k + p: a conv's kernel position p of channel c)."""
        xs = x.reshape(self.length, -1)
        out = x.new_zeros(self.new_length, xs.shape[1])
        out.index_add_(0, self.rows[i], xs.index_select(0, self.cols[i]).mul_(self.vals[i][:, None]))
        return out.reshape(self.new_length * k, *x.shape[1:])

    def apply_joint(self, z: torch.Tensor, k: int = 1) -> torch.Tensor:
        """Σ_i (M_i ⊗ I_k) z_i for z = [z_1; …; z_N] stacked by model along its first axis."""
        parts = z.reshape(self.num_models, self.length * k, *z.shape[1:])
        out = self.apply(0, parts[0], k)
        for i in range(1, self.num_models):
            out += self.apply(i, parts[i], k)
        return out


def axis_map(
    graph: MergeGraph,
    param: str,
    axis: int,
    length: int,
    transforms: Mapping[str, SpaceTransform],
    num_models: int,
) -> AxisMap:
    """Merged axis positions as sparse linear maps of each source's L positions.

    A merge point's segment gets M_i (matched features averaged, unmatched kept); positions in no
    merge point are averaged over the models (1/N each), as the merged weights average them."""
    refs = [(s.name, r) for s in graph.spaces for r in s.members if r.param == param and r.axis == axis]
    members = [_Member(n, r, transforms[n].source_width, transforms[n].width) for n, r in refs]
    plan = plan_axis(length, members, where=f"{param!r} axis {axis}")
    parts: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in range(num_models)]
    fixed = torch.full((len(plan.fixed_old),), 1.0 / num_models, dtype=torch.float64)
    for i in range(num_models):
        parts[i].append((plan.fixed_new.long(), plan.fixed_old.long(), fixed))
    for mem, new_ref in zip(plan.members, plan.new_refs, strict=True):
        old, new = mem.ref.positions(mem.n), new_ref.positions(mem.m)  # (n, K), (m, K)
        for i in range(num_models):
            r, c, v = _entries(transforms[mem.space], i)
            parts[i].append((new[r].flatten(), old[c].flatten(), v.repeat_interleave(old.shape[1])))
    cat = lambda j: tuple(torch.cat([p[j] for p in per]) for per in parts)  # noqa: E731
    return AxisMap(cat(0), cat(1), cat(2), plan.new_length, length)


def _entries(t: SpaceTransform, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Model i's non-zero entries of M_i (rows, cols, vals) on the CPU: read off the assignment when
    the transform keeps one (no (m × n) block is formed), else found in the dense block."""
    columns = t.columns("out")
    if columns is not None:
        rows, vals = (c[i].to("cpu") for c in columns)
        cols = torch.arange(rows.numel())
        keep = vals != 0
        return rows[keep], cols[keep], vals[keep].to(torch.float64)
    block = t.merge_block(i).detach().to("cpu", torch.float64)
    r, c = block.nonzero(as_tuple=True)
    return r, c, block[r, c]
