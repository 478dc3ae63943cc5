"""MaTS (Tam, Bansal & Raffel): merge by solving (Σᵢ Cᵢ) θ = Σᵢ Cᵢ θᵢ with conjugate gradient, Cᵢ
model i's "task parameter subspace" — a Gram (RegMean), diagonal Fisher or K-FAC (Aᵢ ⊗ Gᵢ) block."""

from __future__ import annotations

from typing import Literal

import torch

from lightning_merge.apply.cg import CGResult, Operator, conjugate_gradient
from lightning_merge.methods import same_base as sb
from lightning_merge.methods.fisher_merge import fisher_of, mean_fisher
from lightning_merge.methods.regmean import check_alpha, gram_layers, scaled_grams
from lightning_merge.stats.container import Statistics
from lightning_merge.stats.gram import supported_layers

Subspace = Literal["regmean", "fisher", "kfac"]
Init = Literal["task_arithmetic", "average"]
SUBSPACE_STATS: dict[str, str] = {"regmean": "grams", "fisher": "fisher", "kfac": "kfac"}


def kfac_factors(
    stats: Statistics, layer: str, out: int, width: int, method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked per-model mean factors Āᵢ = Aᵢ/countᵢ (N, d, d) and Ḡᵢ = Gᵢ/countᵢ (N, out, out)."""
    a_list, g_list = [], []
    for i, (factors, count) in enumerate(zip(stats.kfac, stats.kfac_counts, strict=True)):
        a, g = factors[layer]
        sb.check_layer_stat(method, "kfac", i, layer, a, width)
        sb.check_layer_stat(method, "kfac", i, layer, g, out)
        if count <= 0:
            raise ValueError(f"{method}: the K-FAC factors of model {i} were summed over {count} samples")
        a_list.append(a.to(torch.float64) / count)
        g_list.append(g.to(torch.float64) / count)
    return torch.stack(a_list), torch.stack(g_list)


class MaTS(sb.SameBaseMethod):
    """Conjugate-gradient merge in one task parameter subspace, ``iterations`` steps from ``init``.

    * ``subspace="regmean"``: per Linear/Conv layer, (Σ G'ᵢ) Xᵀ = Σ G'ᵢ Wᵢᵀ on the rows of [W | b]
      (G'ᵢ the count-normalised Gram with off-diagonals scaled by ``alpha``; 1 = MaTS' plain Gram);
    * ``subspace="fisher"``: per parameter, (Σ F̄ᵢ) ⊙ θ = Σ F̄ᵢ ⊙ θᵢ (diagonal, count-normalised);
    * ``subspace="kfac"``: per Linear/Conv layer, Σᵢ Ḡᵢ V Āᵢ = Σᵢ Ḡᵢ Wᵢ Āᵢ on V = [W | b], applied as
      two matrix products per model, never forming Āᵢ ⊗ Ḡᵢ.

    ``init="task_arithmetic"`` starts from θ₀ + λΣτᵢ (λ = ``scaling``, needs the base),
    ``"average"`` from the mean. Parameters outside the subspace (norm layers, layers without
    statistics) keep the init, and so do directions no model's statistic sees (CG never moves them).
    The result's ``diagnostics["cg"]`` maps each solved layer/parameter to its :class:`CGResult`.
    """

    name = "mats"

    def __init__(
        self,
        subspace: Subspace = "kfac",
        init: Init = "average",
        scaling: float = 1.0,
        iterations: int = 100,
        alpha: float = 1.0,
        tol: float = 0.0,
    ) -> None:
        if subspace not in SUBSPACE_STATS:
            raise ValueError(f"unknown subspace {subspace!r}; valid: {sorted(SUBSPACE_STATS)}")
        if init not in ("task_arithmetic", "average"):
            raise ValueError(f"unknown init {init!r}; valid: ['average', 'task_arithmetic']")
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
            raise ValueError(f"iterations must be an int >= 0, got {iterations!r}")
        if not isinstance(tol, (int, float)) or not tol >= 0:
            raise ValueError(f"tol must be >= 0, got {tol!r}")
        sb.check_scaling(scaling)
        check_alpha(alpha)
        self.subspace, self.init = subspace, init
        self.scaling, self.iterations, self.alpha, self.tol = (
            float(scaling),
            iterations,
            float(alpha),
            float(tol),
        )

    @property
    def requires(self) -> frozenset[str]:  # type: ignore[override]
        """The one statistic of the chosen subspace."""
        return frozenset({SUBSPACE_STATS[self.subspace]})

    @property
    def needs_base(self) -> bool:  # type: ignore[override]
        """Starting from task arithmetic needs the base; the average does not."""
        return self.init == "task_arithmetic"

    def check_stats(self, stats: Statistics | None) -> None:
        field = SUBSPACE_STATS[self.subspace]
        if stats is None or not getattr(stats, field):
            raise ValueError(
                f"mats: subspace {self.subspace!r} needs the statistic {field!r}, which was not gathered; "
                f"run the statistics pass with it requested (collectors=[...{type(self).__name__}"
                f"(subspace={self.subspace!r}).requires] / MergeStatistics)"
            )

    def _cg(self, operator: Operator, b: torch.Tensor, x0: torch.Tensor, batch_dims: int = 0) -> CGResult:
        return conjugate_gradient(
            operator, b, x0, batch_dims=batch_dims, iterations=self.iterations, tol=self.tol
        )

    def _solve_regmean(self, inputs: sb.SameBaseInputs, merged: sb.State) -> dict[str, CGResult]:
        states, stats, results = inputs.states, inputs.stats, {}
        for layer in gram_layers(inputs.sources, stats, self.name):
            weights = [sb.layer_matrix(s, layer) for s in states]
            grams = scaled_grams(stats, layer, self.alpha, weights[0].shape[1], self.name)
            total = torch.stack(grams).sum(0)
            rhs = sum(w @ g for w, g in zip(weights, grams, strict=True))
            res = self._cg(lambda v, t=total: v @ t, rhs, sb.layer_matrix(merged, layer), batch_dims=1)
            merged.update(sb.split_layer_matrix(res.x, states[0], layer))
            results[layer] = res
        return results

    def _solve_fisher(self, inputs: sb.SameBaseInputs, merged: sb.State) -> dict[str, CGResult]:
        states = inputs.states
        fishers = mean_fisher(inputs.stats, len(states), self.name)
        results = {}
        for name in inputs.params:
            f = fisher_of(fishers, name, states[0][name].shape, self.name)
            if f is None:
                continue
            total, rhs = f.sum(0), (f * sb.stack(states, name)).sum(0)
            res = self._cg(lambda v, t=total: t * v, rhs, merged[name])
            merged[name] = res.x
            results[name] = res
        return results

    def _solve_kfac(self, inputs: sb.SameBaseInputs, merged: sb.State) -> dict[str, CGResult]:
        states, stats, results = inputs.states, inputs.stats, {}
        sb.check_count_list("kfac", stats.kfac, len(states), self.name)
        sb.check_count_list("kfac_counts", stats.kfac_counts, len(states), self.name)
        for layer, _ in supported_layers(inputs.sources[0]):
            if not all(layer in k for k in stats.kfac):
                continue
            w = torch.stack([sb.layer_matrix(s, layer) for s in states])  # (N, out, d)
            a, g = kfac_factors(stats, layer, w.shape[1], w.shape[2], self.name)
            rhs = (g @ w @ a).sum(0)
            res = self._cg(lambda v, a=a, g=g: (g @ v @ a).sum(0), rhs, sb.layer_matrix(merged, layer))
            merged.update(sb.split_layer_matrix(res.x, states[0], layer))
            results[layer] = res
        return results

    def merge_parameters(self, inputs: sb.SameBaseInputs) -> sb.State:
        scaling = self.scaling if self.init == "task_arithmetic" else None
        merged = {name: sb.fallback(inputs.states, inputs.base, name, scaling) for name in inputs.params}
        solve = {"regmean": self._solve_regmean, "fisher": self._solve_fisher, "kfac": self._solve_kfac}
        inputs.diagnostics["cg"] = solve[self.subspace](inputs, merged)
        return merged
