"""Git Re-Basin weight matching (Ainsworth et al., 2023): permutations from weights alone.

For every model i > 0 separately, find permutations P_s of each merge point s maximising
Σ_tensors ⟨W_0, P W_i Pᵀ⟩ (every axis of a tensor permuted by its own space) by coordinate descent:
visit the spaces in a random order, solve each one's linear assignment with all the others fixed,
and stop after a sweep without improvement. The objective is a sum over pairs (0, i), so the N − 1
problems are independent.

The descent starts from a forward pass over the spaces (in graph order) that matches each one on
its producing ("out") slices only, read with the permutations already found upstream. Started
from the identity instead, the consumer slices of a deep, narrow net (MobileNetV2) are read under
wrong downstream permutations; their noise outweighs the producer signal and the descent stalls
in a local optimum even for an exact permuted copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match._weights import StateDict, axes_by_param, check_state_dicts, space_rows
from lightning_merge.match.permute import group_hungarian, permutations_to_transform
from lightning_merge.match.transform import SpaceTransform


def _forward_start(ref_state: StateDict, state_dict: StateDict, graph: MergeGraph) -> dict[str, torch.Tensor]:
    """Match the spaces in forward order on their producer slices whose other axes are already
    matched (upstream permutations applied).

    A producer may also consume a merge point matched later: a squeeze-excitation's second Linear
    produces the block's channels and consumes the squeeze features, whose own producer consumes
    the channels. Read under the identity, such slices are noise, and on EfficientNet-B3 they
    outweighed the rest and the descent stalled far from an exact permuted copy (relative output
    error 1.0); they are left out until every other axis is known."""
    index = axes_by_param(graph)
    perms: dict[str, torch.Tensor] = {}
    for space in graph.spaces:
        known = {name: torch.arange(p.numel()) for name, p in perms.items()}
        for known_only in (True, False):  # fall back to every producer slice when none is known
            try:
                ref = space_rows(ref_state, index, space, known, roles=("out",), known_only=known_only)
                rows = space_rows(state_dict, index, space, perms, roles=("out",), known_only=known_only)
            except ValueError:  # no producing weight (only consumers): the identity for now
                continue
            perms[space.name] = group_hungarian(ref @ rows.T, space.group_size).cpu()
            break
    return {s.name: perms.get(s.name, torch.arange(s.size)) for s in graph.spaces}


def _descend(
    ref_rows: dict[str, torch.Tensor],
    state_dict: StateDict,
    graph: MergeGraph,
    max_iter: int,
    generator: torch.Generator,
    start: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Coordinate descent of one model's permutations onto model 0's (given as ``ref_rows``)."""
    index = axes_by_param(graph)
    perms = dict(start)
    for _ in range(max_iter):
        improved = False
        for k in torch.randperm(len(graph.spaces), generator=generator).tolist():
            space = graph.spaces[k]
            rows = space_rows(state_dict, index, space, perms)
            cost = ref_rows[space.name] @ rows.T  # (model-0 feature, model-i feature)
            new = group_hungarian(cost, space.group_size)
            diag = torch.arange(space.size, device=cost.device)
            gain = cost[diag, new].sum() - cost[diag, perms[space.name].to(cost.device)].sum()
            if gain > 1e-12 * max(1.0, float(cost.abs().sum())):
                improved = True
            perms[space.name] = new.cpu()
        if not improved:
            break
    return perms


def match_weights(
    state_dicts: Sequence[StateDict], graph: MergeGraph, *, max_iter: int = 100, seed: int = 0
) -> dict[str, SpaceTransform]:
    """Permutations of models 1..N−1 onto model 0 for every merge point of ``graph``.

    Returns one :class:`SpaceTransform` (width n, merge averages matched features) per space.
    """
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    check_state_dicts(state_dicts, graph)
    index = axes_by_param(graph)
    ref_rows = {s.name: space_rows(state_dicts[0], index, s, {}) for s in graph.spaces}
    generator = torch.Generator().manual_seed(seed)
    identity = {s.name: torch.arange(s.size) for s in graph.spaces}
    perms = [identity] + [
        _descend(ref_rows, sd, graph, max_iter, generator, _forward_start(state_dicts[0], sd, graph))
        for sd in state_dicts[1:]
    ]
    return {
        s.name: permutations_to_transform([p[s.name] for p in perms], len(state_dicts)) for s in graph.spaces
    }
