"""``own_task_statistics``: each source's Gram / Fisher / K-FAC gathered on its own loader only."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_merge.graph.spec import MergeGraph
from lightning_merge.methods import RegMean
from lightning_merge.methods.same_base import own_task_statistics
from lightning_merge.stats.collect import collect_statistics


def family() -> tuple[nn.Module, list[nn.Module], list[list[torch.Tensor]]]:
    """A float64 base, two perturbed copies and two loaders of different sizes and distributions."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double().eval()
    sources = [copy.deepcopy(base) for _ in range(2)]
    with torch.no_grad():
        for m in sources:
            for p in m.parameters():
                p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    loaders = [
        [torch.randn(8, 4, generator=g, dtype=torch.float64) for _ in range(2)],
        [3 + torch.randn(8, 4, generator=g, dtype=torch.float64) for _ in range(3)],
    ]
    return base, sources, loaders


def alone(model: nn.Module, loader: list[torch.Tensor], name: str) -> object:
    empty = MergeGraph(spaces=[], taps=[], cut_points=[], param_shapes={})
    return collect_statistics([model], empty, loader, requires=[name], progress=False)[name]


def test_each_source_gets_the_statistics_of_its_own_loader() -> None:
    base, sources, loaders = family()
    stats = own_task_statistics(sources, loaders)
    assert stats.num_models == 2 and stats.names() == ["grams", "fisher", "kfac"]
    assert [c["0"] for c in stats.gram_counts] == [16, 24] and stats.fisher_counts == [16, 24]
    for i, (model, loader) in enumerate(zip(sources, loaders, strict=True)):
        gram, fisher, kfac = (alone(model, loader, n) for n in ("grams", "fisher", "kfac"))
        for layer in ("0", "2"):
            assert torch.equal(stats.grams[i][layer], gram.sums[0][layer])
            mine, ref = stats.kfac[i][layer], kfac.factors[0][layer]
            assert all(torch.equal(a, b) for a, b in zip(mine, ref, strict=True))
        assert all(torch.equal(stats.fisher[i][k], v) for k, v in fisher.sums[0].items())
    other = alone(sources[0], loaders[1], "grams")  # the other task's data gives another Gram
    assert not torch.allclose(stats.grams[0]["0"], other.sums[0]["0"])
    merged = RegMean().merge(sources, stats=stats, base=base).model
    assert merged(loaders[0][0]).shape == (8, 3)


def test_a_subset_of_statistics_is_gathered() -> None:
    _, sources, loaders = family()
    assert own_task_statistics(sources, loaders, ["grams"]).names() == ["grams"]


@pytest.mark.parametrize(
    ("loaders", "requires", "message"),
    [
        (1, ["grams"], "one loader per source: got 2 sources and 1 loaders"),
        (2, [], "requires is empty"),
        (2, ["grams", "moments"], "'moments' is joint over the models or unknown"),
    ],
)
def test_bad_inputs_are_named(loaders: int, requires: list[str], message: str) -> None:
    _, sources, data = family()
    with pytest.raises(ValueError, match=message):
        own_task_statistics(sources, data[:loaders], requires)
