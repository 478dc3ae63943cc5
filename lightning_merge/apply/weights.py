"""Merged weights from per-space transforms: W = M_out · blockdiag(W_1 … W_N) · U_in, for every tensor.

Each tensor's axes are tagged by the graph's :class:`~lightning_merge.graph.spec.AxisRef` members.
For model i, every "in" axis segment is contracted with the unmerge block U_i (n × m) and the "out"
axis segment with the merge block M_i (m × n); summing over the models then *is* the cross-model
combination (M's column blocks add up to an average). Positions of an axis that no space claims are
fixed: copied on "in"-style axes, averaged (× 1/N) on the out axis; a tensor with no out axis at all
is averaged after its "in" contractions. The N models are processed together (a leading model axis)
in float64 and the result is cast back to the tensor's dtype.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from lightning_merge.graph.spec import AxisRef, MergeGraph
from lightning_merge.match.transform import SpaceTransform

StateDict = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class _Member:
    """One tagged segment of one axis: the space it belongs to, its ref and the widths n → m."""

    space: str
    ref: AxisRef
    n: int
    m: int


@dataclass(frozen=True)
class _AxisPlan:
    """How one axis of length ``length`` becomes ``new_length``: where each segment lands."""

    length: int
    new_length: int
    fixed_old: torch.Tensor  # positions no space claims, in the source axis
    fixed_new: torch.Tensor  # ... and where they land in the merged axis
    members: tuple[_Member, ...]
    new_refs: tuple[AxisRef, ...]


def plan_axis(length: int, members: Sequence[_Member], where: str) -> _AxisPlan:
    """Lay out the merged axis: each segment block grows from n·inner to m·inner, the rest shifts.

    A block is one ``outer`` repetition of a segment (``size · inner`` contiguous positions); every
    position after a block moves by that block's growth, so offsets and outer strides of later
    segments follow automatically.
    """
    blocks: list[tuple[int, int, int]] = []  # (old start, old length, growth)
    owner = torch.full((length,), -1, dtype=torch.long)
    for k, mem in enumerate(members):
        pos = mem.ref.positions(mem.n)
        if int(pos.max()) >= length or int(pos.min()) < 0:
            raise ValueError(
                f"{where}: merge point {mem.space!r} addresses positions up to {int(pos.max())} "
                f"but the axis has length {length}"
            )
        if bool((owner[pos.flatten()] >= 0).any()):
            raise ValueError(f"{where}: merge point {mem.space!r} overlaps another merge point on this axis")
        owner[pos.flatten()] = k
        stride = mem.ref.outer_stride or mem.n * mem.ref.inner
        for o in range(mem.ref.outer):
            start = mem.ref.offset + o * stride
            blocks.append((start, mem.n * mem.ref.inner, (mem.m - mem.n) * mem.ref.inner))
    ends = torch.tensor([b[0] + b[1] for b in blocks])
    growth = torch.tensor([b[2] for b in blocks])
    # shift(p) = total growth of the blocks that end at or before p.
    old = torch.arange(length)
    shift = ((ends.view(1, -1) <= old.view(-1, 1)) * growth.view(1, -1)).sum(1)
    fixed_old = torch.nonzero(owner < 0).flatten()
    new_refs = []
    for mem in members:
        stride = mem.ref.outer_stride or mem.n * mem.ref.inner
        first = mem.ref.offset
        new_first = first + int(shift[first])
        new_stride = 0
        if mem.ref.outer > 1:
            second = first + stride
            new_stride = second + int(shift[second]) - new_first
        new_refs.append(
            AxisRef(
                param=mem.ref.param,
                axis=mem.ref.axis,
                role=mem.ref.role,
                offset=new_first,
                outer=mem.ref.outer,
                outer_stride=new_stride,
                inner=mem.ref.inner,
            )
        )
    return _AxisPlan(
        length=length,
        new_length=length + int(growth.sum()) if blocks else length,
        fixed_old=fixed_old,
        fixed_new=fixed_old + shift[fixed_old],
        members=tuple(members),
        new_refs=tuple(new_refs),
    )


#: A member's operator: dense (N, m, n), or one entry per column (rows, vals), both (N, n).
AxisOperator = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _apply_operator(op: AxisOperator, seg: torch.Tensor, m: int) -> torch.Tensor:
    """(N, m, R) from (N, n, R): a dense bmm, or for an assignment an index-add per model (n·R work
    instead of m·n·R: 100× less at 4096 features)."""
    if isinstance(op, torch.Tensor):
        return torch.bmm(op, seg)
    rows, vals = op
    out = seg.new_zeros(seg.shape[0], m, seg.shape[2])
    for i in range(seg.shape[0]):
        out[i].index_add_(0, rows[i].to(seg.device), seg[i] * vals[i].to(seg)[:, None])
    return out


def _contract_axis(
    stacked: torch.Tensor, dim: int, plan: _AxisPlan, mats: Sequence[AxisOperator], fixed_scale: float
) -> torch.Tensor:
    """Rebuild axis ``dim`` of the (N, …) stack: segment k ← mats[k] (N, m, n) applied to its features."""
    shape = list(stacked.shape)
    shape[dim] = plan.new_length
    out = stacked.new_zeros(shape)
    if plan.fixed_old.numel():
        kept = stacked.index_select(dim, plan.fixed_old)
        out.index_copy_(dim, plan.fixed_new, kept * fixed_scale if fixed_scale != 1.0 else kept)
    for mem, new_ref, mat in zip(plan.members, plan.new_refs, mats, strict=True):
        pos = mem.ref.positions(mem.n)  # (n, K)
        seg = stacked.index_select(dim, pos.flatten()).movedim(dim, -1)  # (N, R…, n·K)
        lead = seg.shape[:-1]
        k = pos.shape[1]
        seg = seg.reshape(lead[0], -1, mem.n, k).transpose(1, 2).reshape(lead[0], mem.n, -1)  # (N, n, R·K)
        merged = _apply_operator(mat, seg, mem.m).reshape(lead[0], mem.m, -1, k).transpose(1, 2)  # (N,R,m,K)
        merged = merged.reshape(*lead, mem.m * k).movedim(-1, dim)
        out.index_copy_(dim, new_ref.positions(mem.m).flatten(), merged)
    return out


def _members_by_tensor(graph: MergeGraph) -> dict[str, dict[int, list[tuple[str, AxisRef]]]]:
    table: dict[str, dict[int, list[tuple[str, AxisRef]]]] = {}
    for space in graph.spaces:
        for ref in space.members:
            table.setdefault(ref.param, {}).setdefault(ref.axis, []).append((space.name, ref))
    return table


def check_transforms(graph: MergeGraph, transforms: Mapping[str, SpaceTransform], num_models: int) -> None:
    """Every space has a transform of the right source width and model count; no stray transforms."""
    known = {s.name for s in graph.spaces}
    stray = sorted(set(transforms) - known)
    if stray:
        raise KeyError(f"transforms given for merge points {stray} that the graph does not have")
    for space in graph.spaces:
        if space.name not in transforms:
            raise KeyError(f"no transform for merge point {space.name!r}")
        t = transforms[space.name]
        if t.num_models != num_models:
            raise ValueError(
                f"merge point {space.name!r}: transform is for {t.num_models} models, "
                f"got {num_models} state dicts"
            )
        if t.source_width != space.size:
            raise ValueError(
                f"merge point {space.name!r} has size {space.size} but its transform maps "
                f"n={t.source_width} features per model"
            )


def check_state_dicts(state_dicts: Sequence[StateDict]) -> None:
    """All models have the same keys and shapes (names the first difference and the model index)."""
    if len(state_dicts) < 1:
        raise ValueError("need at least one state dict to merge")
    ref = state_dicts[0]
    for i, sd in enumerate(state_dicts[1:], start=1):
        missing = [k for k in ref if k not in sd]
        extra = [k for k in sd if k not in ref]
        if missing or extra:
            key = (missing or extra)[0]
            what = "lacks" if missing else "has the extra key"
            raise KeyError(f"model {i} {what} {key!r} (compared with model 0)")
        for k, v in ref.items():
            if sd[k].shape != v.shape:
                raise ValueError(
                    f"model {i}: {k!r} has shape {tuple(sd[k].shape)}, model 0 has {tuple(v.shape)}"
                )


def merge_state_dicts(
    state_dicts: Sequence[StateDict],
    graph: MergeGraph,
    transforms: Mapping[str, SpaceTransform],
    *,
    keys: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge N state dicts through ``transforms`` (one per space of ``graph``).

    ``keys`` restricts the merge to those tensors (partial zipping merges only the trunk); spaces
    that touch none of them then need no transform. Integer tensors (``num_batches_tracked``) are
    taken from model 0.
    """
    check_state_dicts(state_dicts)
    num = len(state_dicts)
    keys = list(state_dicts[0]) if keys is None else [k for k in state_dicts[0] if k in set(keys)]
    table = _members_by_tensor(graph)
    for param in table:
        if param not in state_dicts[0]:
            raise KeyError(f"the merge graph tags {param!r}, which is not in the state dicts")
    needed = {name for k in keys for refs in table.get(k, {}).values() for name, _ in refs}
    sub = MergeGraph(
        spaces=[s for s in graph.spaces if s.name in needed], taps=[], cut_points=[], param_shapes={}
    )
    check_transforms(sub, {k: v for k, v in transforms.items() if k in needed}, num)
    stray = sorted(set(transforms) - {s.name for s in graph.spaces})
    if stray:
        raise KeyError(f"transforms given for merge points {stray} that the graph does not have")
    merged = OrderedDict(
        (k, _merge_tensor(k, [sd[k] for sd in state_dicts], table.get(k, {}), transforms)) for k in keys
    )
    # Module versions travel with the state dict: torchvision's MNASNet refuses a load without them.
    metadata = getattr(state_dicts[0], "_metadata", None)
    if metadata is not None:
        merged._metadata = copy.copy(metadata)  # type: ignore[attr-defined]
    return merged


def _merge_tensor(
    key: str,
    tensors: Sequence[torch.Tensor],
    axes: Mapping[int, list[tuple[str, AxisRef]]],
    transforms: Mapping[str, SpaceTransform],
) -> torch.Tensor:
    first = tensors[0]
    if not first.is_floating_point():
        return first.clone()
    num = len(tensors)
    stacked = torch.stack([t.detach().to(torch.float64) for t in tensors])
    out_axes = sorted({a for a, refs in axes.items() if any(r.role == "out" for _, r in refs)})
    if len(out_axes) > 1:
        raise ValueError(f"{key!r}: merge points tag several output axes {out_axes}; at most one is allowed")
    # "in" axes first, the out axis last (order does not matter mathematically: they commute).
    for axis in sorted(axes, key=lambda a: a in out_axes):
        if not 0 <= axis < first.dim():
            raise ValueError(f"{key!r} has {first.dim()} dims; the merge graph tags axis {axis}")
        roles = {r.role for _, r in axes[axis]}
        if len(roles) > 1:
            raise ValueError(f"{key!r} axis {axis} is tagged both 'in' and 'out' by different merge points")
        members, mats = [], []
        for name, ref in axes[axis]:
            t = transforms[name]
            n, m = t.source_width, t.width
            members.append(_Member(name, ref, n, m))
            columns = t.columns(ref.role)
            if columns is not None:
                mats.append(columns)
                continue
            blocks = [t.merge_block(i) if ref.role == "out" else t.unmerge_block(i).T for i in range(num)]
            mats.append(torch.stack(blocks).to(torch.float64))
        plan = plan_axis(first.shape[axis], members, where=f"{key!r} axis {axis}")
        is_out = axis in out_axes
        stacked = _contract_axis(stacked, axis + 1, plan, mats, fixed_scale=1.0 / num if is_out else 1.0)
    merged = stacked.sum(0) if out_axes else stacked.mean(0)
    return merged.to(first.dtype)
