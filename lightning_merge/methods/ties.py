"""TIES-merging (Yadav et al.): trim, elect sign, disjoint mean of the task vectors."""

from __future__ import annotations

import torch

from lightning_merge.methods import same_base as sb


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


class TIES(sb.SameBaseMethod):
    """θ = θ₀ + λ · TIES(τ₁ … τ_N) over all parameters; buffers averaged.

    Following the paper, trimming is *global*: the top-``k``% magnitudes are taken over each model's
    whole flattened task vector (all parameters concatenated), not per tensor. Needs the base.
    """

    name = "ties"

    needs_base = True

    def __init__(self, k: float = 20.0, scaling: float = 1.0) -> None:
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 100:
            raise ValueError(f"k (percent of each task vector kept) must be in (0, 100], got {k!r}")
        sb.check_scaling(scaling)
        self.k = float(k)
        self.scaling = float(scaling)

    def merge_parameters(self, inputs: sb.SameBaseInputs) -> sb.State:
        base_st, params = inputs.base, inputs.params
        assert base_st is not None  # needs_base: checked by SameBaseMethod.merge
        flat0 = torch.cat([base_st[p].to(torch.float64).flatten() for p in params])
        tau = torch.stack(
            [torch.cat([s[p].to(torch.float64).flatten() for p in params]) for s in inputs.states]
        )
        merged_flat = flat0 + self.scaling * ties_vector(tau - flat0, self.k)
        chunks = merged_flat.split([base_st[p].numel() for p in params])
        return {p: chunk.reshape(base_st[p].shape) for p, chunk in zip(params, chunks, strict=True)}
