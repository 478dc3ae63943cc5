"""RegMean (Jin et al.): per layer, the weights that best reproduce every model's outputs on its
own inputs, W = (Σᵢ Gᵢ)⁻¹ Σᵢ Gᵢ Wᵢ, from the Gram matrices Gᵢ of the layer inputs."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from lightning_merge.methods import same_base as sb
from lightning_merge.stats.container import Statistics
from lightning_merge.stats.gram import supported_layers

log = logging.getLogger(__name__)


def check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(
            f"alpha (off-diagonal scaling of the Gram matrices) must be in [0, 1], got {alpha!r}"
        )


def gram_layers(sources: Sequence[nn.Module], stats: Statistics, method: str) -> list[str]:
    """Linear/Conv layers of the sources that every model has a Gram matrix for, in module order."""
    sb.check_count_list("grams", stats.grams, len(sources), method)
    sb.check_count_list("gram_counts", stats.gram_counts, len(sources), method)
    return [name for name, _ in supported_layers(sources[0]) if all(name in g for g in stats.grams)]


def scaled_grams(stats: Statistics, layer: str, alpha: float, width: int, method: str) -> list[torch.Tensor]:
    """G'ᵢ = α·Ḡᵢ + (1−α)·diag(Ḡᵢ) with Ḡᵢ = Gᵢ / rowsᵢ (each model weighs alike whatever its row count)."""
    out = []
    for i, (grams, counts) in enumerate(zip(stats.grams, stats.gram_counts, strict=True)):
        g = grams[layer].to(torch.float64)
        sb.check_layer_stat(method, "grams", i, layer, g, width)
        if counts.get(layer, 0) <= 0:
            raise ValueError(f"{method}: the Gram of model {i} at layer {layer!r} was summed over no rows")
        g = g / counts[layer]
        out.append(alpha * g + (1 - alpha) * torch.diag(g.diagonal()))
    return out


def fallback_layer(
    states: Sequence[sb.State], base: sb.State | None, layer: str, scaling: float | None
) -> torch.Tensor:
    """The fallback rule applied to a layer's [W | b]."""
    st = {k: sb.fallback(states, base, k, scaling) for k in sb.layer_params(states[0], layer)}
    return sb.layer_matrix(st, layer)


def solve_regmean(
    grams: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], init: torch.Tensor
) -> torch.Tensor:
    """[W | b] = (Σ G'ᵢ)⁻¹ Σ G'ᵢ Wᵢᵀ (transposed back); input columns no model ever saw (zero Gram
    diagonal, so zero rows and columns of Σ G'ᵢ) keep ``init``'s values."""
    total = torch.stack(list(grams)).sum(0)
    rhs = sum(g @ w.T for g, w in zip(grams, weights, strict=True))
    active = total.diagonal() > 0
    out = init.clone()
    a = total[active][:, active]
    try:
        out[:, active] = torch.linalg.solve(a, rhs[active]).T
    except RuntimeError:  # exactly singular (α = 1 with duplicate inputs): minimum-norm solution
        log.warning("RegMean: singular Gram sum of size %d, using a least-squares solve", a.shape[0])
        out[:, active] = torch.linalg.lstsq(a, rhs[active]).solution.T
    return out


class RegMean(sb.SameBaseMethod):
    """Closed-form RegMean on every Linear / ungrouped Conv2d layer with Gram statistics.

    Each layer is solved in the augmented [W | b] layout (the Gram has a constant-1 column when the
    layer has a bias), so weight and bias are merged jointly. Off-diagonals are scaled by ``alpha``.
    Fallback rule for everything else (norm layers, embeddings, layers without statistics, input
    columns never active): the plain average, or task arithmetic θ₀ + λΣτᵢ with λ = ``scaling``
    when a base and ``scaling`` are given. Buffers (frozen class embeddings, BN stats) are averaged.
    """

    name = "regmean"

    requires = frozenset({"grams"})

    def __init__(self, alpha: float = 0.9, scaling: float | None = None) -> None:
        check_alpha(alpha)
        sb.check_scaling(scaling, allow_none=True)
        self.alpha = float(alpha)
        self.scaling = None if scaling is None else float(scaling)

    def merge_parameters(self, inputs: sb.SameBaseInputs) -> sb.State:
        states, base_st, stats = inputs.states, inputs.base, inputs.stats
        merged: sb.State = {}
        done: set[str] = set()
        for layer in gram_layers(inputs.sources, stats, self.name):
            weights = [sb.layer_matrix(s, layer) for s in states]
            grams = scaled_grams(stats, layer, self.alpha, weights[0].shape[1], self.name)
            init = fallback_layer(states, base_st, layer, self.scaling)
            merged.update(sb.split_layer_matrix(solve_regmean(grams, weights, init), states[0], layer))
            done.update(sb.layer_params(states[0], layer))
        for name in inputs.params:
            if name not in done:
                merged[name] = sb.fallback(states, base_st, name, self.scaling)
        return merged
