"""Per-feature weight vectors of a merge point, read through the graph's axis references.

Weight matching and MuDSC's weight similarity both compare, for every feature of a space, the
slices of all tensors that touch it. A tensor's *other* axes may belong to other spaces; when a
permutation for those is known the slices are read with it applied, so that model i's vectors are
expressed in model 0's coordinates on every other axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lightning_merge.graph.spec import AxisRef, MergeGraph, Space

# Batch statistics are data, not weights: Git Re-Basin and MuDSC leave them out of the objective.
SKIP_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")

StateDict = Mapping[str, torch.Tensor]


def axes_by_param(graph: MergeGraph) -> dict[str, list[tuple[Space, AxisRef]]]:
    """Every (space, axis reference) that touches each parameter."""
    index: dict[str, list[tuple[Space, AxisRef]]] = {}
    for space in graph.spaces:
        for ref in space.members:
            index.setdefault(ref.param, []).append((space, ref))
    return index


def check_state_dicts(state_dicts: Sequence[StateDict], graph: MergeGraph) -> None:
    """Every model must hold every member tensor of the graph, with model 0's shape."""
    if len(state_dicts) < 2:
        raise ValueError(f"need at least 2 state dicts, got {len(state_dicts)}")
    for name in axes_by_param(graph):
        if name.endswith(SKIP_SUFFIXES):
            continue
        for i, sd in enumerate(state_dicts):
            if name not in sd:
                raise KeyError(f"model {i} has no tensor {name!r} named by the merge graph")
            if sd[name].shape != state_dicts[0][name].shape:
                raise ValueError(
                    f"tensor {name!r}: model {i} has shape {tuple(sd[name].shape)}, "
                    f"model 0 has {tuple(state_dicts[0][name].shape)}"
                )


def feature_rows(tensor: torch.Tensor, ref: AxisRef, size: int) -> torch.Tensor:
    """(size, D): the slice of ``tensor`` belonging to each feature along ``ref``'s axis."""
    pos = ref.positions(size).to(tensor.device)
    moved = tensor.movedim(ref.axis, 0)
    return moved[pos.reshape(-1)].reshape(size, -1)


def permute_axis(tensor: torch.Tensor, ref: AxisRef, size: int, perm: torch.Tensor) -> torch.Tensor:
    """Reorder the features along ``ref``: new feature k is old feature ``perm[k]``."""
    pos = ref.positions(size).to(tensor.device)
    idx = torch.arange(tensor.shape[ref.axis], device=tensor.device)
    idx[pos.reshape(-1)] = pos[perm.to(tensor.device)].reshape(-1)
    return tensor.index_select(ref.axis, idx)


def space_rows(
    state_dict: StateDict,
    index: dict[str, list[tuple[Space, AxisRef]]],
    space: Space,
    perms: Mapping[str, torch.Tensor],
    roles: tuple[str, ...] = ("out", "in"),
    *,
    known_only: bool = False,
) -> torch.Tensor:
    """(n, D) float64: every member's slice per feature, other axes permuted by ``perms``.

    ``known_only``: leave out members with another axis in a merge point that has no entry in
    ``perms`` yet (read unpermuted, their slices would be noise)."""
    parts = []
    for member in space.members:
        if member.role not in roles or member.param.endswith(SKIP_SUFFIXES):
            continue
        others = [o.name for o, ref in index[member.param] if ref.axis != member.axis]
        if known_only and any(name not in perms for name in others):
            continue
        tensor = state_dict[member.param].detach().to(torch.float64)
        for other_space, other in index[member.param]:
            if other.axis != member.axis and other_space.name in perms:
                tensor = permute_axis(tensor, other, other_space.size, perms[other_space.name])
        parts.append(feature_rows(tensor, member, space.size))
    if not parts:
        raise ValueError(f"merge point {space.name!r} has no weight member with role in {roles}")
    return torch.cat(parts, dim=1)


# (consume, produce) maps of one model into a merge point's merged coordinates, both (m, n).
AxisMaps = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def _map_axis(
    tensor: torch.Tensor, axis: int, items: list[tuple[AxisRef, int, torch.Tensor]]
) -> torch.Tensor:
    """Replace the features of every (ref, size, map) on ``axis`` by ``map @ features``.

    Positions of the axis that belong to no mapped space are kept, after the mapped blocks; every
    model is treated alike, so the flattened vectors stay comparable across models.
    """
    moved = tensor.movedim(axis, 0)
    covered = torch.zeros(moved.shape[0], dtype=torch.bool, device=tensor.device)
    parts = []
    for ref, size, mat in items:
        pos = ref.positions(size).to(tensor.device).reshape(-1)
        covered[pos] = True
        block = moved[pos].reshape(size, -1)
        parts.append((mat.to(block) @ block).reshape(-1, *moved.shape[1:]))
    parts.append(moved[~covered])
    return torch.cat(parts).movedim(0, axis)


def weight_members(space: Space, roles: tuple[str, ...] = ("out", "in")) -> list[AxisRef]:
    """The members whose slices make up a feature's weight vector (batch statistics left out)."""
    members = [m for m in space.members if m.role in roles and not m.param.endswith(SKIP_SUFFIXES)]
    if not members:
        raise ValueError(f"merge point {space.name!r} has no weight member with role in {roles}")
    return members


def mapped_member_rows(
    state_dict: StateDict,
    index: dict[str, list[tuple[Space, AxisRef]]],
    space: Space,
    member: AxisRef,
    maps: AxisMaps,
) -> torch.Tensor:
    """(n, d) float64: ``member``'s slice of every feature of ``space``, with every other axis carried
    into the merged coordinates of its merge point: ``maps[name][0]`` along axes that consume that
    point's features, ``maps[name][1]`` along axes that produce them (MuDSC's weight vectors)."""
    tensor = state_dict[member.param].detach().to(torch.float64)
    by_axis: dict[int, list[tuple[AxisRef, int, torch.Tensor]]] = {}
    for other_space, other in index[member.param]:
        if other.axis != member.axis and other_space.name in maps:
            mat = maps[other_space.name][0 if other.role == "in" else 1]
            by_axis.setdefault(other.axis, []).append((other, other_space.size, mat))
    for axis, items in by_axis.items():
        tensor = _map_axis(tensor, axis, items)
    return feature_rows(tensor, member, space.size)


def mapped_space_rows(
    state_dict: StateDict,
    index: dict[str, list[tuple[Space, AxisRef]]],
    space: Space,
    maps: AxisMaps,
    roles: tuple[str, ...] = ("out", "in"),
) -> torch.Tensor:
    """(n, D): :func:`mapped_member_rows` of every weight member, side by side."""
    parts = [mapped_member_rows(state_dict, index, space, m, maps) for m in weight_members(space, roles)]
    return torch.cat(parts, dim=1)
