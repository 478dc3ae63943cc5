"""Fisher merging (Matena & Raffel): a per-entry average weighted by each model's diagonal Fisher."""

from __future__ import annotations

import torch

from lightning_merge.methods import same_base as sb
from lightning_merge.stats.container import Statistics


def mean_fisher(stats: Statistics, n: int, method: str) -> list[dict[str, torch.Tensor]]:
    """Per-model mean Fisher F̄ᵢ = Fᵢ / countᵢ (so models seen on different sample counts weigh alike)."""
    sb.check_count_list("fisher", stats.fisher, n, method)
    sb.check_count_list("fisher_counts", stats.fisher_counts, n, method)
    for i, c in enumerate(stats.fisher_counts):
        if c <= 0:
            raise ValueError(
                f"{method}: the Fisher of model {i} was summed over {c} samples; gather data first"
            )
    return [
        {k: v.to(torch.float64) / c for k, v in f.items()}
        for f, c in zip(stats.fisher, stats.fisher_counts, strict=True)
    ]


def fisher_of(
    fishers: list[dict[str, torch.Tensor]], name: str, shape: torch.Size, method: str
) -> torch.Tensor | None:
    """(N, *shape) stack of the models' Fisher of ``name``, or None when some model lacks it."""
    if any(name not in f for f in fishers):
        return None
    for i, f in enumerate(fishers):
        if f[name].shape != shape:
            raise ValueError(
                f"{method}: Fisher of model {i} for {name!r} has shape {tuple(f[name].shape)}, "
                f"the parameter has {tuple(shape)}"
            )
    return torch.stack([f[name] for f in fishers])


class FisherMerge(sb.SameBaseMethod):
    """θ = Σᵢ F̄ᵢθᵢ / Σᵢ F̄ᵢ per parameter entry, F̄ᵢ = max(Fᵢ/countᵢ, ``fisher_floor``).

    Entries whose Fisher mass is zero in every model (floor 0) and parameters with no Fisher at all
    fall back to the plain average; buffers are averaged. Computed as θ₁ + Σᵢ wᵢ(θᵢ − θ₁) with
    wᵢ = F̄ᵢ / Σⱼ F̄ⱼ, so merging identical models returns them bit for bit. A base, if given, only
    has to be compatible: the weighted average of θᵢ equals θ₀ plus that of the task vectors.
    """

    name = "fisher"

    requires = frozenset({"fisher"})

    def __init__(self, fisher_floor: float = 1e-6) -> None:
        if (
            isinstance(fisher_floor, bool)
            or not isinstance(fisher_floor, (int, float))
            or not fisher_floor >= 0
        ):
            raise ValueError(f"fisher_floor must be a number >= 0, got {fisher_floor!r}")
        self.fisher_floor = float(fisher_floor)

    def merge_parameters(self, inputs: sb.SameBaseInputs) -> sb.State:
        states = inputs.states
        fishers = mean_fisher(inputs.stats, len(states), self.name)
        merged: sb.State = {}
        for name in inputs.params:
            f = fisher_of(fishers, name, states[0][name].shape, self.name)
            if f is None:
                merged[name] = sb.average(states, name)
                continue
            f = f.clamp_min(self.fisher_floor)
            mass = f.sum(0)
            w = torch.where(mass > 0, f / torch.where(mass > 0, mass, 1.0), 1.0 / len(states))
            theta = sb.stack(states, name)
            merged[name] = theta[0] + (w * (theta - theta[0])).sum(0)
        return merged
