"""TIES-merging (Yadav et al.): trim, elect sign, disjoint mean of the task vectors."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_merge.graph.spec import MergeGraph
from lightning_merge.methods import same_base as sb
from lightning_merge.methods.base import MergeMethod, register_method
from lightning_merge.stats.container import Statistics


def ties_vector(tau: torch.Tensor, k: float) -> torch.Tensor:
    """TIES on stacked flat task vectors ``tau`` (N, D) → the merged task vector (D,).

    1. trim: keep each vector's round(k% · D) largest-magnitude entries (at least one), zero the rest;
    2. elect: γ = sign(Σᵢ τ̂ᵢ), the sign with the larger total mass per entry;
    3. disjoint mean: average only the kept entries whose sign equals γ (0 where none does).
    """
    n, d = tau.shape
    keep = max(1, round(k / 100.0 * d))
    idx = tau.abs().topk(keep, dim=1).indices
    trimmed = torch.zeros_like(tau).scatter_(1, idx, tau.gather(1, idx))
    elected = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    return (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)


@register_method("ties")
class TIES(MergeMethod):
    """θ = θ₀ + λ · TIES(τ₁ … τ_N) over all parameters; buffers averaged.

    Following the paper, trimming is *global*: the top-``k``% magnitudes are taken over each model's
    whole flattened task vector (all parameters concatenated), not per tensor. Needs the base.
    """

    needs_base = True

    def __init__(self, k: float = 20.0, scaling: float = 1.0) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 100:
            raise ValueError(f"k (percent of each task vector kept) must be in (0, 100], got {k!r}")
        sb.check_scaling(scaling)
        self.k = float(k)
        self.scaling = float(scaling)

    def merge(
        self,
        sources: Sequence[nn.Module],
        *,
        graph: MergeGraph | None = None,
        stats: Statistics | None = None,
        base: nn.Module | None = None,
        data: Iterable[Any] | None = None,
    ) -> nn.Module:
        if base is None:
            raise ValueError(
                "ties: TIES works on task vectors θᵢ − θ₀ and needs the shared base model: pass base=..."
            )
        states = sb.check_sources(sources, base, self.name)
        base_st = sb.base_state(base)
        params = sb.parameter_names(sources[0])
        flat0 = torch.cat([base_st[p].to(torch.float64).flatten() for p in params])
        tau = torch.stack([torch.cat([s[p].to(torch.float64).flatten() for p in params]) for s in states])
        merged_flat = flat0 + self.scaling * ties_vector(tau - flat0, self.k)
        merged = sb.buffers_rule(states, params)
        for p, chunk in zip(params, merged_flat.split([base_st[p].numel() for p in params]), strict=True):
            merged[p] = chunk.reshape(base_st[p].shape)
        return sb.build(sources[0], merged)
