"""PLeaS' per-merge-point widths under a compute budget (two models).

At merge point k with n_k features per model, u_k of them left unmatched (ratio r_k = u_k / n_k),
the merged width is n_k + u_k. A layer reading merge point i and writing merge point o has, with the
cross blocks between the two models' unmatched features held at zero, (1 + r_i + r_o − r_i·r_o)
of a source layer's weights and FLOPs (a fixed axis has r = 0: 1 + r for a layer with one merged
axis). PLeaS' code (``qp_ratios`` in SewoongLab/PLeaS-Merging) picks the r_k by maximising
Σ_k w_k·r_k subject to total FLOPs ≤ budget × a source's, with Gurobi on the non-convex program.
We solve the same program greedily in steps of about n_k/32 features: each step raises the r_k with
the largest objective gain per added FLOP that still fits. A layer's marginal cost in r_i is
(1 − r_o) ≥ 0, falling as its neighbours open up, so this greedy ascent is the natural first-order
solution (for layers that each touch one merge point it is the fractional-knapsack optimum, up to
the step size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerCost:
    """One Linear/Conv layer: its source FLOPs (any unit) and the merge points of its in/out axes."""

    flops: float
    space_in: str | None
    space_out: str | None


def relative_flops(layers: Sequence[LayerCost], ratios: Mapping[str, float]) -> float:
    """Merged FLOPs over a source's at unmatched ratios ``ratios`` (missing merge points: 0)."""
    total = sum(layer.flops for layer in layers)
    if total <= 0:
        raise ValueError("the layers' FLOPs sum to zero: nothing to budget")
    merged = 0.0
    for layer in layers:
        ri = ratios.get(layer.space_in, 0.0) if layer.space_in else 0.0
        ro = ratios.get(layer.space_out, 0.0) if layer.space_out else 0.0
        merged += layer.flops * (1 + ri + ro - ri * ro)
    return merged / total


def budget_unmatched(
    layers: Sequence[LayerCost],
    sizes: Mapping[str, int],
    weights: Mapping[str, float],
    budget: float,
    steps: int = 32,
) -> dict[str, int]:
    """Unmatched feature count u_k per merge point maximising Σ w_k·u_k/n_k with FLOPs ≤ ``budget``.

    ``budget`` is relative to one source (1: a full merge, 2: both sources side by side)."""
    if not 1.0 <= budget <= 2.0:
        raise ValueError(f"budget must be in [1, 2] (relative FLOPs of one source), got {budget!r}")
    unknown = sorted({s for layer in layers for s in (layer.space_in, layer.space_out) if s} - set(sizes))
    if unknown:
        raise KeyError(f"layers name merge points {unknown} without a size")
    bad = sorted(k for k, w in weights.items() if not w >= 0)
    if bad:
        raise ValueError(f"objective weights must be >= 0; merge points {bad} are not")
    unmatched = {k: 0 for k in sizes}
    ratios = {k: 0.0 for k in sizes}
    current = relative_flops(layers, ratios)
    while True:
        best: tuple[float, str, int, float] | None = None
        for k, n in sizes.items():
            step = min(max(1, n // steps), n - unmatched[k])
            if step == 0:
                continue
            trial = {**ratios, k: (unmatched[k] + step) / n}
            cost = relative_flops(layers, trial)
            if cost > budget + 1e-12:
                continue
            gain = max(weights.get(k, 1.0), 1e-5) * step / n / max(cost - current, 1e-12)
            if best is None or gain > best[0]:
                best = (gain, k, step, cost)
        if best is None:
            return unmatched
        _, k, step, current = best
        unmatched[k] += step
        ratios[k] = unmatched[k] / sizes[k]
