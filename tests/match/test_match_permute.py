"""Weight averaging, Permute (Hungarian) and PLeaS partial matching."""

from __future__ import annotations

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from lightning_merge.match import match_identity, match_partial, match_permute


def permuted_copies(n: int, num_models: int, seed: int, noise: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(n, 400, generator=gen, dtype=torch.float64)
    perms = [torch.arange(n)] + [torch.randperm(n, generator=gen) for _ in range(num_models - 1)]
    feats = torch.cat([f[p] + noise * torch.randn(n, 400, generator=gen, dtype=torch.float64) for p in perms])
    return torch.corrcoef(feats), perms


def test_identity_averages_feature_k_of_every_model():
    t = match_identity(5, 3)
    expected = torch.cat([torch.eye(5, dtype=torch.float64)] * 3, dim=1) / 3
    assert torch.equal(t.merge, expected)
    assert torch.equal(t.unmerge, torch.cat([torch.eye(5, dtype=torch.float64)] * 3))
    with pytest.raises(ValueError, match="num_models"):
        match_identity(5, 1)
    with pytest.raises(ValueError, match="n .*positive"):
        match_identity(0, 2)


@pytest.mark.parametrize(("num_models", "anchor"), [(2, "first"), (3, "first"), (3, "mean"), (4, "mean")])
def test_permute_recovers_permuted_copies(num_models, anchor):
    corr, perms = permuted_copies(24, num_models, seed=num_models)
    t = match_permute(corr, num_models, anchor=anchor)
    for i, p in enumerate(perms):
        assert torch.equal(t.unmerge_block(i).argmax(1), p)  # feature f[p[j]] → merged p[j]
    # merging the copies reproduces model 0's features exactly
    x = torch.randn(24, 7, dtype=torch.float64)
    stacked = torch.cat([x[p] for p in perms])
    assert torch.allclose(t.merge @ stacked, x)


def test_permute_is_the_hungarian_optimum():
    corr, _ = permuted_copies(16, 2, seed=1, noise=3.0)
    t = match_permute(corr, 2)
    p = t.unmerge_block(1).argmax(0)  # model-1 feature matched to merged (= model-0) feature k
    rows, cols = linear_sum_assignment(corr[:16, 16:].numpy(), maximize=True)
    best = corr[:16, 16:].numpy()[rows, cols].sum()
    assert corr[torch.arange(16), 16 + p].sum().item() == pytest.approx(best, abs=1e-12)


def test_mean_anchor_differs_from_first_anchor_only_in_its_reference():
    corr, _ = permuted_copies(16, 3, seed=2, noise=2.0)
    first = match_permute(corr, 3, anchor="first")
    mean = match_permute(corr, 3, anchor="mean")
    assert torch.equal(first.unmerge_block(1), mean.unmerge_block(1))  # model 1 sees model 0 only
    with pytest.raises(ValueError, match="anchor"):
        match_permute(corr, 3, anchor="median")


def test_permute_with_groups_moves_whole_groups():
    n, g = 16, 4
    corr, _ = permuted_copies(n, 2, seed=3, noise=1.0)
    t = match_permute(corr, 2, group_size=g)
    p = t.unmerge_block(1).argmax(0)
    for k in range(0, n, g):
        assert len(set((p[k : k + g] // g).tolist())) == 1
    with pytest.raises(ValueError, match="group_size=5 does not divide"):
        match_permute(corr, 2, group_size=5)


def test_permute_group_recovery():
    n, g = 12, 3
    gen = torch.Generator().manual_seed(9)
    f = torch.randn(n, 300, generator=gen, dtype=torch.float64)
    perm = (torch.randperm(n // g, generator=gen)[:, None] * g + torch.randperm(g, generator=gen)).reshape(-1)
    t = match_permute(torch.corrcoef(torch.cat([f, f[perm]])), 2, group_size=g)
    assert torch.equal(t.unmerge_block(1).argmax(1), perm)


def test_partial_at_full_width_is_the_ensemble():
    corr, _ = permuted_copies(10, 2, seed=4)
    t = match_partial(corr, 2, target_width=20)
    assert torch.equal(t.merge, torch.eye(20, dtype=torch.float64))
    assert torch.equal(t.unmerge, torch.eye(20, dtype=torch.float64))


def test_partial_at_n_is_the_hungarian_permutation():
    corr, _ = permuted_copies(10, 2, seed=5, noise=2.0)
    t = match_partial(corr, 2, target_width=10)
    ref = match_permute(corr, 2)
    assert torch.equal(t.merge, ref.merge)
    assert torch.equal(t.unmerge, ref.unmerge)


def test_partial_fuses_the_best_matched_pairs():
    n, m = 12, 17
    corr, _ = permuted_copies(n, 2, seed=6, noise=2.0)
    t = match_partial(corr, 2, target_width=m)
    k = 2 * n - m
    perm = match_permute(corr, 2).unmerge_block(1).argmax(0)
    score = corr[torch.arange(n), n + perm]
    top = set(torch.topk(score, k).indices.tolist())
    u0, u1 = t.unmerge_block(0), t.unmerge_block(1)
    fused = (u0.sum(0) > 0) & (u1.sum(0) > 0)
    assert int(fused.sum()) == k and bool(fused[:k].all())  # fused pairs come first
    assert set(u0[:, :k].argmax(0).tolist()) == top
    assert torch.equal(u1[:, :k].argmax(0), perm[u0[:, :k].argmax(0)])
    assert torch.equal(u0[:, k:n].argmax(0), torch.tensor(sorted(set(range(n)) - top)))
    assert torch.allclose(t.merge.sum(1), torch.ones(m, dtype=torch.float64))


def test_partial_errors_name_the_culprit():
    corr, _ = permuted_copies(6, 2, seed=0)
    with pytest.raises(ValueError, match=r"target_width=13 is outside \[n, N·n\] = \[6, 12\]"):
        match_partial(corr, 2, target_width=13)
    with pytest.raises(ValueError, match=r"target_width=5 is outside"):
        match_partial(corr, 2, target_width=5)
    corr3, _ = permuted_copies(4, 3, seed=0)
    with pytest.raises(ValueError, match="exactly 2 models.*num_models=3"):
        match_partial(corr3, 3, target_width=6)
    bad = corr.clone()
    bad[0, 7] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite entry inf at \(0, 7\)"):
        match_partial(bad, 2, target_width=8)
