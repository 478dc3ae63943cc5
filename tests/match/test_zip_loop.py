"""The compiled CPU loop of ZipIt! (lightning_merge/match/_zip_loop.py) at its default block sizes.

The in-place torch loop, itself checked against the literal reference in test_match_zipit.py, is
the oracle: both must make exactly the same fusions, or both find no allowed pair.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_match_zipit import random_corr, structured_corr

from lightning_merge.match import zip as zip_module
from lightning_merge.match._zip_loop import greedy_fusions
from lightning_merge.match.zip import zipit_budget, zipit_fusions


def _corr(kind: str, n: int, num_models: int, seed: int) -> torch.Tensor:
    if kind == "structured":  # clusters of near-equal entries and all-zero features: ties
        return structured_corr(n, num_models, seed)
    return random_corr(n, num_models, seed, quantize=4 if kind == "ties" else None)


def _same_as_torch_loop(corr: torch.Tensor, num_models: int, m: int, alpha: float, beta: float) -> bool:
    """True when both loops fuse the same pairs; False when both are stuck (fails otherwise)."""
    try:
        eager = zipit_fusions(corr, num_models, m, alpha, beta, backend="torch")
    except ValueError:
        with pytest.raises(ValueError, match="found no allowed pair"):
            zipit_fusions(corr, num_models, m, alpha, beta, backend="numpy")
        return False
    compiled = zipit_fusions(corr, num_models, m, alpha, beta, backend="numpy")
    assert compiled == eager, f"m={m}: first difference at step {_first_difference(compiled, eager)}"
    return True


def _first_difference(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize(("alpha", "beta"), [(0.3, 0.125), (0.0, 0.0), (-1.0, 0.5), (0.7, 0.0), (1.0, 1.0)])
@pytest.mark.parametrize("kind", ["random", "ties", "structured"])
@pytest.mark.parametrize(("num_models", "n"), [(2, 150), (3, 56)])
def test_compiled_loop_makes_the_torch_loops_fusions(alpha, beta, kind, num_models, n):
    # Widths past several flushes of the default FLUSH, so fused rows are read from the
    # transposed store, its unflushed tail and their own slots alike.
    assert n * (num_models - 1) > 4 * zip_module.FLUSH
    corr = _corr(kind, n, num_models, seed=n + num_models)
    compared = sum(
        _same_as_torch_loop(corr, num_models, m, alpha, beta)
        for m in (n, (num_models + 1) * n // 2, num_models * n - 3)
    )
    assert compared >= 1  # not every width is out of reach


def test_compiled_loop_reads_any_layout_and_leaves_the_input_alone():
    corr = structured_corr(40, 2, seed=3)
    before = corr.clone()
    fusions = zipit_fusions(corr, 2, 40, 0.3, 0.125)
    assert torch.equal(corr, before)
    assert zipit_fusions(corr.T, 2, 40, 0.3, 0.125) == fusions  # a non-contiguous view of the same matrix
    assert len(fusions) == 40 and len({hi for _, hi in fusions}) == 40  # every absorbed feature once


def test_kernel_reports_how_far_it_got():
    # alpha <= 0, beta = 0, N = 3: the kernel stops early and says after how many fusions.
    corr = random_corr(6, 3, seed=4).numpy()
    out = np.full((12, 2), -1, dtype=np.int64)
    budget = zipit_budget(18, 6, 3, 0.0)
    scratch = np.empty((12, 18)), np.empty((18, 12))
    done = greedy_fusions(corr, 3, 0.0, budget, zip_module.FLUSH, zip_module.SCATTER, *scratch, out)
    assert 0 < done < 12
    assert (out[:done] >= 0).all() and (out[:done, 0] < out[:done, 1]).all()
    with pytest.raises(ValueError, match=rf"after {done} of 12 fusions"):
        zipit_fusions(torch.from_numpy(corr), 3, 6, 0.0, 0.0)
