"""Statistics read off plain forwards share one data pass, with the very sums of separate passes."""

from __future__ import annotations

import pytest
import torch
from stats_nets import ConvNet, conv_graph, make_models
from torch import nn

from lightning_merge.stats.collect import build_collectors, collect_statistics, passes
from lightning_merge.stats.collector import SharedForward
from lightning_merge.stats.store import flatten_statistics

FORWARD_ONLY = ["moments", "joint_inputs", "grams"]


def _count_forwards(models: list[nn.Module]) -> list[int]:
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    for m in models:
        m.register_forward_hook(hook)
    return calls


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(5, 1, 6, 6, generator=gen) for _ in range(3)]


def test_forward_only_statistics_share_one_pass_and_equal_separate_passes_bitwise() -> None:
    models = make_models(ConvNet)
    graph = conv_graph(models[0])
    calls = _count_forwards(models)
    together = collect_statistics(models, graph, _batches(), requires=FORWARD_ONLY, progress=False)
    assert calls[0] == len(models) * 3  # one forward per model and batch, not one per statistic
    apart = {}
    for name in FORWARD_ONLY:
        alone = collect_statistics(models, graph, _batches(), requires=[name], progress=False)
        apart.update(flatten_statistics(alone)[0])
    joint, _ = flatten_statistics(together)
    assert joint.keys() == apart.keys()
    for key, value in joint.items():
        assert torch.equal(value, apart[key]), key


def test_gradient_statistics_keep_their_own_pass_after_the_shared_one() -> None:
    graph = conv_graph(make_models(ConvNet)[0])
    collectors = build_collectors(["fisher", "moments", "grams"], graph)
    plan = passes(collectors)
    assert isinstance(plan[0], SharedForward) and [c.name for c in plan[0].parts] == ["moments", "grams"]
    assert [c.name for c in plan[1:]] == ["fisher"]


def test_a_forward_that_raises_surfaces_its_own_error_not_a_stash_complaint() -> None:
    models = make_models(ConvNet)
    graph = conv_graph(models[0])

    def boom(*_: object) -> None:
        raise RuntimeError("the user's forward failed")

    models[1].conv2.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="the user's forward failed"):
        collect_statistics(models, graph, _batches(), requires=FORWARD_ONLY, progress=False)
