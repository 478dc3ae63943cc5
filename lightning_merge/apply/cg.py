"""Conjugate gradient on a linear operator given as a callable (MaTS).

Solves C x = b for a symmetric positive semi-definite C that is only *applied* (``operator(x)``),
never formed: e.g. V ↦ Σᵢ Gᵢ V Aᵢ for K-FAC, V ↦ V Σᵢ Gramᵢ for RegMean, v ↦ (Σᵢ Fᵢ) ⊙ v for a
diagonal Fisher. ``x`` may be any tensor shape; its first ``batch_dims`` axes index independent
systems (e.g. the output rows of a weight matrix that share one Gram), the rest is the vector, with
the Frobenius inner product. Everything runs in float64.

CG minimises the energy f(x) = ½ xᵀCx − bᵀx over growing Krylov spaces, so f(x_k), equivalently
the C-norm error ‖x_k − x*‖_C = ‖r_k‖_{C⁻¹}, never increases; the Euclidean residual ‖r_k‖ may.
Both histories are returned (f computed as −½⟨x, b + r⟩ from the kept residual, no extra product).
On a consistent singular system (zero rows of C, e.g. inputs never active) the components of x in
the null space keep their initial value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Operator = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class CGResult:
    x: torch.Tensor  # the last iterate, float64, shape of b
    residual_norms: torch.Tensor  # (iterations + 1, *batch): ‖b − C x_k‖₂
    energy: torch.Tensor  # (iterations + 1, *batch): f(x_k) = ½ x_kᵀ C x_k − bᵀ x_k
    iterations: int


def _dot(u: torch.Tensor, v: torch.Tensor, batch_dims: int) -> torch.Tensor:
    return (u * v).flatten(batch_dims).sum(-1)


def _expand(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.reshape(s.shape + (1,) * (like.ndim - s.ndim))


def conjugate_gradient(
    operator: Operator,
    b: torch.Tensor,
    x0: torch.Tensor | None = None,
    *,
    batch_dims: int = 0,
    iterations: int = 100,
    tol: float = 0.0,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> CGResult:
    """Run at most ``iterations`` CG steps from ``x0`` (zeros if None).

    Stops early once every system has ‖r‖ ≤ ``tol``·‖b‖ (``tol=0`` runs all iterations; converged
    systems of a batch stop moving). ``callback(k, x_k)`` sees every iterate, x_0 included.
    """
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if not 0 <= batch_dims < max(b.ndim, 1):
        raise ValueError(
            f"batch_dims must be in [0, {b.ndim}) for b of shape {tuple(b.shape)}, got {batch_dims}"
        )
    b = b.to(torch.float64)
    x = torch.zeros_like(b) if x0 is None else x0.to(torch.float64).clone()
    if x.shape != b.shape:
        raise ValueError(f"x0 has shape {tuple(x.shape)} but b has shape {tuple(b.shape)}")
    r = b - operator(x)
    p = r.clone()
    rs = _dot(r, r, batch_dims)
    stop = tol * _dot(b, b, batch_dims).sqrt()
    norms, energy = [rs.sqrt()], [-0.5 * _dot(x, b + r, batch_dims)]
    if callback is not None:
        callback(0, x)
    k = 0
    while k < iterations and not bool((rs.sqrt() <= stop).all()):
        k += 1
        cp = operator(p)
        pcp = _dot(p, cp, batch_dims)
        moving = (pcp > 0) & (rs.sqrt() > stop)
        alpha = torch.where(moving, rs / torch.where(moving, pcp, 1.0), 0.0)
        x = x + _expand(alpha, x) * p
        r = r - _expand(alpha, r) * cp
        rs_new = _dot(r, r, batch_dims)
        beta = torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, 1.0), 0.0)
        p = r + _expand(beta, p) * p
        rs = rs_new
        norms.append(rs.sqrt())
        energy.append(-0.5 * _dot(x, b + r, batch_dims))
        if callback is not None:
            callback(k, x)
    return CGResult(x=x, residual_norms=torch.stack(norms), energy=torch.stack(energy), iterations=k)
