"""Statistics whose accumulators cannot fit are refused before the data pass, not OOM-killed in it."""

from __future__ import annotations

import pytest
import torch
from stats_nets import ConvNet, conv_graph, make_models
from torch import nn

from lightning_merge.stats import collect
from lightning_merge.stats.joint_inputs import joint_inputs_memory_bytes
from lightning_merge.stats.moments import moments_memory_bytes


def _counted(models: list[nn.Module]) -> list[int]:
    calls = [0]
    for m in models:
        m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_accumulators_larger_than_free_memory_are_refused_before_any_forward(monkeypatch) -> None:
    models = make_models(ConvNet)
    graph = conv_graph(models[0])
    need = moments_memory_bytes(graph, 2) + joint_inputs_memory_bytes(models[0], 2)
    monkeypatch.setattr(collect, "available_memory_bytes", lambda device: need - 1)
    calls = _counted(models)
    batches, requires = [torch.randn(4, 1, 6, 6)], ["moments", "joint_inputs"]
    with pytest.raises(MemoryError, match=r"'moments' .* GiB, 'joint_inputs' .* GiB\), more than the"):
        collect.collect_statistics(models, graph, batches, requires=requires, progress=False)
    assert calls[0] == 0
    monkeypatch.setattr(collect, "available_memory_bytes", lambda device: need)
    stats = collect.collect_statistics(models, graph, batches, requires=requires, progress=False)
    assert "moments" in stats and "joint_inputs" in stats and calls[0] == 2


def test_free_memory_of_this_host_is_read() -> None:
    free = collect.available_memory_bytes(torch.device("cpu"))
    assert free is None or free > 0
    assert collect.available_memory_bytes(torch.device("meta")) is None
