"""REPAIR rescaling: merged layers get their sources' merged channel statistics, and nothing else."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_merge.apply.module import build_merged_module
from lightning_merge.apply.repair import repair_points, repair_rescale
from lightning_merge.apply.weights import merge_state_dicts
from lightning_merge.graph import trace_graph
from lightning_merge.match.transform import SpaceTransform, from_assignment
from lightning_merge.models import MLP, VGG11BN


class ConvNet(nn.Module):
    """Conv → ReLU → conv → ReLU → pool → Linear: no normalisation anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(h.mean((2, 3)))


def _random_transforms(graph, seed: int, extra: int = 2) -> dict[str, SpaceTransform]:
    """Two models, each merge point m = n + extra wide, a random partial fusion (every m used)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for space in graph.spaces:
        n = space.size
        m = min(2 * n, n + extra)
        second = torch.cat([torch.randperm(n, generator=gen)[: 2 * n - m], torch.arange(n, m)])
        assign = torch.cat([torch.randperm(n, generator=gen), second[torch.randperm(n, generator=gen)]])
        out[space.name] = from_assignment(assign, m, 2)
    return out


def _channel_moments(model: nn.Module, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    box: list[torch.Tensor] = []
    h = model.get_submodule(name).register_forward_hook(lambda _m, _a, y: box.append(y.double()))
    with torch.no_grad():
        model(x)
    h.remove()
    y = box[0]
    rows = y.transpose(0, 1).reshape(y.shape[1], -1) if y.dim() == 4 else y.T
    return rows.mean(1), rows.var(1, unbiased=False).sqrt()


def _setup(cls: type[nn.Module]) -> tuple[list[nn.Module], nn.Module, object, dict, torch.Tensor]:
    torch.manual_seed(0)
    sources = [cls().eval() for _ in range(2)]
    x = torch.randn(64, 1, 8, 8)
    graph = trace_graph(sources[0], x[:2])
    tr = _random_transforms(graph, seed=1)
    merged = build_merged_module(sources[0], merge_state_dicts([s.state_dict() for s in sources], graph, tr))
    return sources, merged.eval(), graph, tr, x


@pytest.mark.parametrize("cls", [ConvNet, lambda: MLP(image_size=8, hidden=(12, 10), embed_dim=16)])
def test_every_point_gets_the_merged_source_statistics(cls) -> None:
    """Over 4 batches, the folded layers reproduce μ* = Σ M_i μ_i and σ* = Σ M_i σ_i exactly (eps → 0)."""
    sources, merged, graph, tr, x = _setup(cls)
    points = repair_points(merged, graph)
    assert points  # every hidden layer of these nets is un-normalised
    repair_rescale(merged, sources, graph, tr, list(x.split(16)), eps=1e-12)
    for name, space in points.items():
        src = [_channel_moments(s, name, x) for s in sources]
        blocks = [tr[space].merge_block(i) for i in range(2)]
        want_mean = sum(m @ mu for m, (mu, _) in zip(blocks, src, strict=True))
        want_std = sum(m @ sd for m, (_, sd) in zip(blocks, src, strict=True))
        got_mean, got_std = _channel_moments(merged, name, x)
        torch.testing.assert_close(got_mean, want_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_std, want_std, rtol=1e-4, atol=1e-5)


def test_merging_a_model_with_itself_is_left_as_it_is() -> None:
    torch.manual_seed(2)
    net = ConvNet().eval()
    x = torch.randn(32, 1, 8, 8)
    graph = trace_graph(net, x[:2])
    ident = {s.name: from_assignment(torch.cat([torch.arange(s.size)] * 2), s.size, 2) for s in graph.spaces}
    merged = copy.deepcopy(net)
    repair_rescale(merged, [net, net], graph, ident, [x[:16], x[16:]], eps=1e-12)
    for key, want in net.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], want, rtol=1e-5, atol=1e-6)


def test_normalised_points_are_left_to_the_batchnorm_reset() -> None:
    """VGG-11-BN: every conv feeds a BatchNorm, so REPAIR rescales nothing and changes nothing."""
    net = VGG11BN(width=0.125).eval()
    graph = trace_graph(net, torch.randn(2, 1, 28, 28))
    assert repair_points(net, graph) == {}
    before = copy.deepcopy(net.state_dict())
    repair_rescale(net, [net, net], graph, {}, [torch.randn(4, 1, 28, 28)])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_bad_inputs_name_the_culprit() -> None:
    sources, merged, graph, tr, x = _setup(ConvNet)
    with pytest.raises(ValueError, match="eps"):
        repair_rescale(merged, sources, graph, tr, [x], eps=0)
    with pytest.raises(ValueError, match="max_batches"):
        repair_rescale(merged, sources, graph, tr, [x], max_batches=0)
    with pytest.raises(ValueError, match="empty"):
        repair_rescale(merged, sources, graph, tr, [])
    space = repair_points(merged, graph)["a"]
    with pytest.raises(KeyError, match=space):
        repair_rescale(merged, sources, graph, {k: v for k, v in tr.items() if k != space}, [x])
    merged.a.bias = None
    with pytest.raises(ValueError, match=r"\['a'\]"):
        repair_rescale(merged, sources, graph, tr, [x])
