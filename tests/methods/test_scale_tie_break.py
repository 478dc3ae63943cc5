"""Exact correlation ties are broken by scale, so a permuted copy comes back even from tied statistics.

With two calibration samples every live feature correlates ±1 with every other (of its own model and
of the twin): correlation alone cannot tell a feature's true partner from a proportional neighbour. A
squeeze-excitation layer with 16 images is the real case (torchvision's RegNet-Y at 16 images came back
5e-3 off with Permute and ZipIt! before the tie-break).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge.graph import permute_model, random_permutations, trace_graph
from lightning_merge.methods import MuDSCMerge, PermuteMerge, PLeaSMerge, ZipItMerge, transform_base
from lightning_merge.models.mlp import MLP
from lightning_merge.stats.collect import collect_statistics
from lightning_merge.stats.container import FeatureMoments, Statistics

#: the matchings alone (PLeaS' least-squares refit of 12-input layers from 2 rows is another matter)
METHODS = [
    PermuteMerge(),
    ZipItMerge(alpha=0.0, beta=0.0),
    PLeaSMerge(width=1.0, refit=False),
    MuDSCMerge(lam=1.0, alpha=0.0, beta=0.0),
]


def _twin_error(method, images: int) -> float:
    """Relative output error of ``method`` merging a small float64 MLP with a permuted copy."""
    torch.manual_seed(0)
    model = MLP(image_size=4, hidden=(12, 10), head="linear", num_classes=3).double().eval()
    x = torch.randn(images, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    graph = trace_graph(model, x[:2])
    twin = permute_model(copy.deepcopy(model), graph, random_permutations(graph, seed=3))
    data = DataLoader(TensorDataset(x), batch_size=64)
    stats = collect_statistics([model, twin], graph, data, requires=sorted(method.requires), progress=False)
    merged = method.merge([model, twin], graph=graph, stats=stats, data=data).model.eval()
    with torch.no_grad():
        ref = model(x)
        return float((merged(x) - ref).norm() / ref.norm())


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_two_samples_tie_every_feature_and_the_scale_tie_break_still_returns_the_twin(method) -> None:
    assert _twin_error(method, images=2) < 1e-10


@pytest.mark.parametrize("method", METHODS[:2], ids=lambda m: m.name)
def test_without_the_tie_break_the_tied_twin_does_not_come_back(method, monkeypatch) -> None:
    monkeypatch.setattr(transform_base, "SCALE_TIE_BREAK", 0.0)
    assert _twin_error(method, images=2) > 1e-3


def test_the_tie_break_only_subtracts_a_scale_term_far_below_real_correlation_gaps() -> None:
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-2, 2, 8, dtype=torch.float64)
    f = torch.randn(500, 8, generator=gen, dtype=torch.float64) * scales
    moments = FeatureMoments(torch.tensor(500.0, dtype=torch.float64), f.sum(0), f.T @ f, num_models=2)
    held = Statistics(num_models=2, graph_digest="x", values={"moments": {"s": moments}})
    got = transform_base.correlation(held, "s")
    plain = moments.correlation()
    assert torch.equal(got.diagonal(), plain.diagonal())
    assert torch.allclose(got, got.T, atol=0, rtol=0)
    gap = (plain - got).abs().max()
    assert 0 < gap < 1e-8  # log(1e4) · 1e-9 ≈ 9.2e-9 at most here
