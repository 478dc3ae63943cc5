"""Conjugate gradient on operator callables: exact solves, monotone C-norm error, batching, errors."""

from __future__ import annotations

import pytest
import torch

from lightning_merge.apply.cg import conjugate_gradient


def spd(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rank or 2 * n, n, generator=g, dtype=torch.float64)
    return x.T @ x / x.shape[0]


def test_dense_system_matches_solve_and_stops_at_tol() -> None:
    c = spd(12, 0)
    b = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    res = conjugate_gradient(lambda v: c @ v, b, iterations=100, tol=1e-12)
    torch.testing.assert_close(res.x, torch.linalg.solve(c, b), rtol=1e-9, atol=1e-9)
    assert res.iterations <= 30 and res.residual_norms.shape == (res.iterations + 1,)
    assert res.residual_norms[-1] <= 1e-12 * b.norm()
    # energy history is f(x_k) = ½xᵀCx − bᵀx, computed from the kept residual
    torch.testing.assert_close(res.energy[-1], 0.5 * res.x @ c @ res.x - b @ res.x)


def test_kfac_operator_error_is_monotone_in_the_c_norm() -> None:
    """V ↦ Σᵢ Gᵢ V Aᵢ on a 5×7 layer of 2 models: ‖x_k − x*‖_C never increases (x* dense)."""
    out, d = 5, 7
    a = torch.stack([spd(d, 10 + i, rank=4) + 0.05 * torch.eye(d, dtype=torch.float64) for i in range(2)])
    g = torch.stack([spd(out, 20 + i, rank=3) + 0.05 * torch.eye(out, dtype=torch.float64) for i in range(2)])
    w = torch.randn(2, out, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    rhs = (g @ w @ a).sum(0)
    dense = sum(torch.kron(g[i], a[i]) for i in range(2))  # row-major vec(G V A) = (G ⊗ A) vec(V)
    x_star = torch.linalg.solve(dense, rhs.flatten()).reshape(out, d)
    errors: list[float] = []

    def c_norm_error(k: int, x: torch.Tensor) -> None:
        e = (x - x_star).flatten()
        errors.append(float(e @ dense @ e))

    res = conjugate_gradient(
        lambda v: (g @ v @ a).sum(0), rhs, w.mean(0), iterations=80, callback=c_norm_error
    )
    errs = torch.tensor(errors, dtype=torch.float64)
    assert len(errors) == 81
    assert (errs[1:] <= errs[:-1] * (1 + 1e-9) + 1e-24).all(), errs
    assert errs[-1] < 1e-12 * errs[0]
    # the energy differs from ½‖x − x*‖²_C by a constant, so it is monotone too
    torch.testing.assert_close(res.energy - res.energy[-1], 0.5 * (errs - errs[-1]), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(res.x, x_star, rtol=1e-8, atol=1e-8)


def test_batched_rows_each_solve_their_own_system() -> None:
    """batch_dims=1: rows of X are independent systems X[r] S = B[r] with per-row step sizes."""
    s = spd(9, 4)
    b = torch.randn(6, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    res = conjugate_gradient(lambda v: v @ s, b, batch_dims=1, iterations=60, tol=1e-13)
    torch.testing.assert_close(res.x, torch.linalg.solve(s, b.T).T, rtol=1e-9, atol=1e-9)
    assert res.residual_norms.shape[1] == 6


def test_singular_consistent_system_keeps_null_space_at_init() -> None:
    c = torch.diag(torch.tensor([2.0, 0.0, 5.0, 0.0], dtype=torch.float64))
    b = torch.tensor([4.0, 0.0, 5.0, 0.0], dtype=torch.float64)
    x0 = torch.tensor([0.0, 7.0, 0.0, -3.0], dtype=torch.float64)
    res = conjugate_gradient(lambda v: c @ v, b, x0, iterations=10)
    torch.testing.assert_close(res.x, torch.tensor([2.0, 7.0, 1.0, -3.0], dtype=torch.float64))
    assert torch.isfinite(res.energy).all()


def test_zero_iterations_return_the_init() -> None:
    x0 = torch.ones(3, dtype=torch.float32)
    res = conjugate_gradient(lambda v: 2 * v, torch.zeros(3), x0, iterations=0)
    assert res.iterations == 0 and res.x.dtype == torch.float64 and torch.equal(res.x, x0.double())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"iterations": -1}, "iterations must be >= 0"),
        ({"tol": -1.0}, "tol must be >= 0"),
        ({"batch_dims": 1}, "batch_dims must be in"),
        ({"x0": torch.zeros(4)}, r"x0 has shape \(4,\) but b has shape \(3,\)"),
    ],
)
def test_bad_arguments_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        conjugate_gradient(lambda v: v, torch.ones(3), **kwargs)
