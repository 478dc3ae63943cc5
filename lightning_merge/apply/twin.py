"""The merge stage of the graph check: a model merged with its permuted copy must come back.

Permuting a model gathers "out" and "in" axes alike; merging plans every tagged axis (segments,
offsets, outer blocks), averages producers with M and copies consumers with U. So a graph the merge
cannot apply (two producer axes on one tensor, overlapping segments), or applies wrongly, is caught
here even when permuting alone is a symmetry. It lives in ``apply`` because it runs the real merge
code; :func:`check_equivalence` is the full check (permutation, then merge) that a merge runs first.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from lightning_merge.apply.weights import merge_state_dicts
from lightning_merge.graph.equivalence import check_equivalence as check_permutation
from lightning_merge.graph.equivalence import permute_model
from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match.transform import SpaceTransform, from_assignment


def twin_transforms(graph: MergeGraph, perms: Mapping[str, torch.Tensor]) -> dict[str, SpaceTransform]:
    """Per space, the transform that merges a model with its ``permute_model(perms)`` copy exactly."""
    out = {}
    for space in graph.spaces:
        n = space.size
        assign = torch.cat([torch.arange(n), torch.as_tensor(perms[space.name], dtype=torch.long)])
        out[space.name] = from_assignment(assign, n, 2)
    return out


def merged_twin(model: nn.Module, graph: MergeGraph, perms: Mapping[str, torch.Tensor]) -> nn.Module:
    """``model`` merged with its permuted copy through the true permutations (the apply path)."""
    twin = permute_model(copy.deepcopy(model), graph, perms)
    state = merge_state_dicts([model.state_dict(), twin.state_dict()], graph, twin_transforms(graph, perms))
    merged = copy.deepcopy(model)
    merged.load_state_dict(state)
    return merged


def check_equivalence(
    model: nn.Module, graph: MergeGraph, example_input: torch.Tensor, **kwargs: object
) -> float:
    """The full graph check: permuting every merge point, then merging the model with its permuted
    copy, must both leave the outputs unchanged (keyword arguments as
    :func:`lightning_merge.graph.check_equivalence`)."""
    return check_permutation(model, graph, example_input, merge=merged_twin, **kwargs)  # type: ignore[arg-type]
