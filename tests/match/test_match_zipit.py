"""ZipIt!: the fast incremental matcher against the literal greedy reference, and its properties."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn
from zipit_reference import zipit_reference

from lightning_merge.match import match_zipit
from lightning_merge.match import zip as zip_module
from lightning_merge.match.zip import assignment_from_fusions, zipit_budget, zipit_fusions

FASHION = Path("/usr/share/datasets/fashion-mnist")


def random_corr(n: int, num_models: int, seed: int, quantize: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_models * n, 3 * n, generator=gen, dtype=torch.float64)
    corr = torch.corrcoef(x)
    if quantize:  # few distinct values: many exact ties
        corr = torch.round(corr * quantize) / quantize
    return (corr + corr.T) / 2


def both(corr: torch.Tensor, num_models: int, m: int, alpha: float, beta: float, backend: str = "auto"):
    """(fusions, assignment) of the fast and of the reference implementation, or the error text."""
    try:
        fast = zipit_fusions(corr, num_models, m, alpha, beta, backend=backend)
        fast_assign = assignment_from_fusions(fast, corr.shape[0], corr.device)
    except ValueError:
        fast, fast_assign = "stuck", None
    try:
        ref, ref_assign = zipit_reference(corr, num_models, m, alpha, beta)
    except ValueError:
        ref, ref_assign = "stuck", None
    return fast, fast_assign, ref, ref_assign


CASES = list(
    itertools.product(
        [0, 1, 2],  # seed
        [2, 3],  # models
        [(0.3, 0.125), (0.0, 0.0), (1.0, 1.0), (-1.0, 0.5), (0.5, 0.0), (0.7, 0.4)],
        [None, 4],  # continuous values / heavy ties
    )
)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize(("seed", "num_models", "alpha_beta", "quantize"), CASES)
def test_fast_zipit_makes_the_reference_fusions(seed, num_models, alpha_beta, quantize, backend):
    alpha, beta = alpha_beta
    n = 12
    corr = random_corr(n, num_models, seed, quantize)
    compared = 0
    for m in (n, (num_models + 1) * n // 2, num_models * n - 1, num_models * n):
        fast, fast_assign, ref, ref_assign = both(corr, num_models, m, alpha, beta, backend)
        assert fast == ref, f"m={m}"
        if fast != "stuck":
            assert len(fast) == num_models * n - m
            assert torch.equal(fast_assign, ref_assign)
            compared += 1
    assert compared >= 2  # the grid is not all infeasible


def test_backend_is_checked():
    with pytest.raises(ValueError, match="backend must be"):
        zipit_fusions(random_corr(4, 2, seed=0), 2, 4, 0.3, 0.1, backend="cupy")


def test_ties_follow_the_lowest_flat_index():
    # Every off-diagonal entry equal: the reference takes (0, 1), then the fused row's first
    # remaining best, ...; the fast one must walk the same path.
    corr = torch.full((8, 8), 0.5, dtype=torch.float64)
    corr.fill_diagonal_(1.0)
    for backend in ("numpy", "torch"):
        fast, _, ref, _ = both(corr, 2, 4, 1.0, 1.0, backend)
        assert fast == ref
        assert fast[0] == (0, 1)


def test_stuck_matching_raises_with_the_culprits():
    # alpha <= 0 with beta = 0 and N = 3: on random data fused pairs soon block each other.
    corr = random_corr(6, 3, seed=4)
    fast, _, ref, _ = both(corr, 3, 6, 0.0, 0.0)
    assert fast == ref == "stuck"
    with pytest.raises(ValueError, match=r"after \d+ of 12 fusions: alpha=0.0 and beta=0.0"):
        match_zipit(corr, 3, alpha=0.0, beta=0.0, target_width=6)
    assert match_zipit(corr, 3, alpha=0.0, beta=0.0, target_width=12).width == 12  # reachable


def test_budget_formula_matches_the_paper_defaults():
    assert zipit_budget(256, 128, 2, 0.125) == 8  # floor(64 * 0.125)
    assert zipit_budget(12, 6, 3, 1.0) == 2
    assert zipit_budget(100, 50, 2, 0.0) == 0


def _conv_features(seed: int, images: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 32, 3, padding=1), nn.ReLU())
    with torch.no_grad():
        out = net(images)  # (B, 32, 28, 28): every position is a sample
    return out.permute(1, 0, 2, 3).reshape(32, -1).to(torch.float64)


@pytest.fixture(scope="module")
def real_corr() -> torch.Tensor:
    from lightning_merge.data import load_split

    images, _ = load_split(FASHION, train=False)
    x = images[:64].unsqueeze(1).float() / 255.0
    feats = torch.cat([_conv_features(0, x), _conv_features(1, x)])
    cov = torch.cov(feats)
    std = cov.diagonal().sqrt()
    assert int((std == 0).sum()) > 0  # dead ReLU channels: all-zero rows, i.e. many exact ties
    corr = cov / torch.outer(std, std).clamp_min(1e-7)  # as ZipIt! does: dead features score 0
    return (corr + corr.T) / 2


@pytest.mark.parametrize(
    ("alpha", "beta", "m"), [(0.3, 0.125, 32), (0.5, 1.0, 48), (0.0, 0.0, 32), (0.3, 0.5, 40)]
)
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_fast_zipit_matches_reference_on_real_covariance(real_corr, alpha, beta, m, backend):
    fast, fast_assign, ref, ref_assign = both(real_corr, 2, m, alpha, beta, backend)
    assert fast != "stuck"
    assert fast == ref
    assert torch.equal(fast_assign, ref_assign)
    same_model = sum((lo < 32) == (hi < 32) for lo, hi in fast)
    if beta > 0:
        assert same_model <= zipit_budget(64, m, 2, beta) * 2
    else:
        assert same_model == 0


@pytest.mark.parametrize("num_models", [2, 3])
def test_permuted_copies_are_recovered_with_beta0_alpha0(num_models):
    n = 20
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(n, 500, generator=gen, dtype=torch.float64)
    perms = [torch.arange(n)] + [torch.randperm(n, generator=gen) for _ in range(num_models - 1)]
    corr = torch.corrcoef(torch.cat([f[p] for p in perms]))
    t = match_zipit(corr, num_models, alpha=0.0, beta=0.0)
    assert t.width == n
    for i, p in enumerate(perms):
        # model i's feature j is f[p[j]]: it must land on merged feature p[j] (model 0's index).
        assert torch.equal(t.unmerge_block(i).argmax(1), p)
        assert torch.equal(t.unmerge_block(i).sum(1), torch.ones(n, dtype=torch.float64))
    assert torch.allclose(t.merge.sum(1), torch.ones(n, dtype=torch.float64))


def test_merge_averages_and_unmerge_copies():
    corr = random_corr(10, 2, seed=5)
    t = match_zipit(corr, 2, alpha=0.3, beta=0.5, target_width=14)
    u = t.unmerge
    assert t.merge.shape == (14, 20) and u.shape == (20, 14)
    assert torch.equal(u.sum(1), torch.ones(20, dtype=torch.float64))  # every feature goes somewhere
    assert torch.allclose(t.merge, (u / u.sum(0)).T)  # rows average their sources
    assert torch.equal(match_zipit(corr, 2, target_width=20).merge, torch.eye(20, dtype=torch.float64))


def test_groups_stay_intact():
    n, g = 12, 4
    corr = random_corr(n, 2, seed=6)
    t = match_zipit(corr, 2, alpha=0.3, beta=0.5, target_width=18, group_size=g)
    assert t.width == 18
    per_group = 18 // (n // g)
    for i in range(2):
        owner = t.unmerge_block(i).argmax(1)  # merged feature of each source feature
        for grp in owner.view(n // g, g):
            assert len(set((grp // per_group).tolist())) == 1  # a source group → one merged group


def test_groups_recover_a_group_permutation():
    n, g = 16, 4
    gen = torch.Generator().manual_seed(7)
    f = torch.randn(n, 400, generator=gen, dtype=torch.float64)
    perm = (torch.randperm(n // g, generator=gen)[:, None] * g + torch.randperm(g, generator=gen)).reshape(-1)
    corr = torch.corrcoef(torch.cat([f, f[perm]]))
    t = match_zipit(corr, 2, alpha=0.0, beta=0.0, group_size=g)
    src0 = t.unmerge_block(0).argmax(1)
    src1 = t.unmerge_block(1).argmax(1)
    assert torch.equal(src1, src0[perm])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_width": 7}, "target_width=7 is outside"),
        ({"target_width": 17}, "target_width=17 is outside"),
        ({"alpha": 1.5}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"beta": -0.1}, "beta"),
        ({"beta": 1.2}, "beta"),
        ({"group_size": 3}, "group_size=3 does not divide"),
        ({"group_size": 4, "target_width": 11}, "multiple of the number of groups"),
    ],
)
def test_bad_options_name_the_culprit(kwargs, match):
    with pytest.raises(ValueError, match=match):
        match_zipit(random_corr(8, 2, seed=0), 2, **kwargs)


def test_bad_matrices_name_the_culprit():
    corr = random_corr(8, 2, seed=0)
    with pytest.raises(ValueError, match="square"):
        match_zipit(corr[:, :15], 2)
    with pytest.raises(ValueError, match="not N·n for N=3"):
        match_zipit(corr, 3)
    bad = corr.clone()
    bad[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite entry nan at \(2, 5\)"):
        match_zipit(bad, 2)
    bad = corr.clone()
    bad[1, 3] += 0.5
    with pytest.raises(ValueError, match="symmetric"):
        match_zipit(bad, 2)
    with pytest.raises(ValueError, match="num_models"):
        match_zipit(corr, 1)
    with pytest.raises(TypeError, match="torch.Tensor"):
        match_zipit(corr.numpy(), 2)


@pytest.mark.parametrize(("n", "num_models", "m"), [(64, 2, 64), (64, 2, 100), (32, 3, 40)])
def test_fast_zipit_matches_reference_at_larger_widths(n, num_models, m):
    corr = random_corr(n, num_models, seed=n + num_models)
    fast, fast_assign, ref, ref_assign = both(corr, num_models, m, 0.3, 0.125)
    assert fast != "stuck" and fast == ref
    assert torch.equal(fast_assign, ref_assign)
    t = match_zipit(corr, num_models, alpha=0.3, beta=0.125, target_width=m)
    assert torch.equal(t.unmerge.argmax(1), ref_assign)


def structured_corr(n: int, num_models: int, seed: int) -> torch.Tensor:
    """Permuted noisy copies of low-rank features per model: clusters of near-equal correlations
    (rows sharing a best partner, so many rescans), plus a few dead (all-zero) features: ties."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, max(n // 8, 2), generator=gen, dtype=torch.float64)
    blocks = [base[torch.randperm(n, generator=gen)] for _ in range(num_models)]
    load = torch.cat([b + 0.7 * torch.randn(b.shape, generator=gen, dtype=torch.float64) for b in blocks])
    load[torch.randperm(len(load), generator=gen)[: len(load) // 10]] = 0.0
    cov = load @ load.T + torch.diag(torch.rand(len(load), generator=gen, dtype=torch.float64))
    std = cov.diagonal().sqrt()
    corr = cov / torch.outer(std, std)
    return (corr + corr.T) / 2


@pytest.mark.parametrize(("alpha", "beta"), [(0.3, 0.125), (0.0, 0.0), (0.7, 0.4), (-1.0, 0.5), (1.0, 1.0)])
@pytest.mark.parametrize("kind", ["random", "ties", "structured"])
@pytest.mark.parametrize("num_models", [2, 3])
@pytest.mark.parametrize("scatter", [0, 10**9])
def test_lazy_loop_matches_in_place_loop_through_flushes(monkeypatch, alpha, beta, kind, num_models, scatter):
    # Tiny FLUSH so the transposed slot store and its unflushed tail are both read many times, and
    # both ways of hiding a slot row's changed columns (one by one, or by version); the in-place
    # torch loop (checked against the reference above) is the oracle.
    monkeypatch.setattr(zip_module, "FLUSH", 3)
    monkeypatch.setattr(zip_module, "SCATTER", scatter)
    n = 30
    corr = structured_corr(n, num_models, seed=num_models) if kind == "structured" else None
    if corr is None:
        corr = random_corr(n, num_models, seed=num_models, quantize=4 if kind == "ties" else None)
    compared = 0
    for m in (n, 3 * n // 2, num_models * n - 5):
        try:
            eager = zipit_fusions(corr, num_models, m, alpha, beta, backend="torch")
        except ValueError:
            with pytest.raises(ValueError, match="found no allowed pair"):
                zipit_fusions(corr, num_models, m, alpha, beta, backend="numpy")
            continue
        assert zipit_fusions(corr, num_models, m, alpha, beta, backend="numpy") == eager, f"m={m}"
        compared += 1
    assert compared >= 1
