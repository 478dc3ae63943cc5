"""The fast least-squares refit (resumed fx forwards, strided patches, chunked float64 sums) against
a plain float64 reference that re-runs every model per layer and unfolds with ``F.unfold``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_merge.apply import least_squares as ls
from lightning_merge.graph.spec import AxisRef, MergeGraph, Space
from lightning_merge.match.transform import SpaceTransform, from_assignment
from lightning_merge.stats import patch_gram

# the even "same" kernel below is deliberate (asymmetric padding); torch warns about its extra copy
pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same.:UserWarning")


class ResNetLike(nn.Module):
    """Residual conv net with stride, dilation, 'same' padding, a bias-free conv and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.a = nn.Conv2d(6, 6, 3, padding=2, dilation=2, bias=False)
        self.b = nn.Conv2d(6, 6, 4, padding="same")
        self.down = nn.Conv2d(6, 5, (3, 2), stride=(2, 1), padding=(1, 0))
        self.fc = nn.Linear(5 * 4 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = h + torch.tanh(self.b(torch.relu(self.a(h))))
        return self.fc(torch.relu(self.down(h)).flatten(1))


class Untraceable(ResNetLike):
    """Data-dependent control flow: torch.fx cannot trace it, so the refit must replay it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 1e9:
            return x
        return super().forward(x)


def graph_and_transforms() -> tuple[MergeGraph, dict[str, SpaceTransform]]:
    """Merge points at ``stem``+``b`` (the residual), ``a`` and ``down``; random 2-model partial fusions."""
    spaces = [
        Space("h", 6, [AxisRef("stem.weight", 0, "out"), AxisRef("b.weight", 0, "out")]),
        Space("g", 6, [AxisRef("a.weight", 0, "out")]),
        Space("d", 5, [AxisRef("down.weight", 0, "out")]),
    ]
    gen = torch.Generator().manual_seed(0)
    tr = {}
    for space, m in zip(spaces, (8, 8, 7), strict=True):
        n, s = space.size, space.name
        second = torch.cat([torch.randperm(n, generator=gen)[: 2 * n - m], torch.arange(n, m)])
        assign = torch.cat([torch.randperm(n, generator=gen), second[torch.randperm(n, generator=gen)]])
        tr[s] = from_assignment(assign, m, 2)
    return MergeGraph(spaces, [], [], {}), tr


def reference_refit(
    merged: nn.Module, sources: list[nn.Module], graph: MergeGraph, tr: dict, data: list, ridge: float
) -> None:
    """The textbook algorithm in float64: per layer, re-run everything, unfold, append ones, solve."""
    for name in ls.forward_order(merged, data[0]):
        layer = merged.get_submodule(name)
        space = ls._out_space(graph, name)
        xs, ys = [], []
        for x in data:
            inp = ls._capture(merged, name, x, output=False)
            outs = [ls._capture(s, name, x, output=True).double() for s in sources]
            if isinstance(layer, nn.Conv2d):
                inp = F.pad(inp, layer._reversed_padding_repeated_twice)  # "same" included
                inp = F.unfold(inp, layer.kernel_size, layer.dilation, 0, layer.stride)
                inp = inp.transpose(1, 2).reshape(-1, inp.shape[1])
                outs = [o.flatten(2).transpose(1, 2).reshape(-1, o.shape[1]) for o in outs]
            if space is None:
                y = torch.stack(outs).mean(0)
            else:
                y = sum(o @ tr[space].merge_block(i).double().T for i, o in enumerate(outs))
            inp = inp.double()
            if layer.bias is not None:
                inp = torch.cat([inp, inp.new_ones(len(inp), 1)], 1)
            xs.append(inp)
            ys.append(y)
        x, y = torch.cat(xs), torch.cat(ys)
        xx = x.T @ x
        xx += ridge * xx.diagonal().mean() * torch.eye(len(xx), dtype=xx.dtype)
        sol = torch.linalg.solve(xx, (y.T @ x).T).T
        with torch.no_grad():
            if layer.bias is not None:
                layer.bias.copy_(sol[:, -1])
                sol = sol[:, :-1]
            layer.weight.copy_(sol.reshape(layer.weight.shape))


def sources_and_merged(cls: type[nn.Module]) -> tuple[list[nn.Module], nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    sources = [cls().eval() for _ in range(2)]
    merged = ResNetLike()  # wider merge points: rebuild the layers at the merged widths
    merged.stem, merged.a = (
        nn.Conv2d(2, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False),
    )
    merged.b, merged.down = (
        nn.Conv2d(8, 8, 4, padding="same"),
        nn.Conv2d(8, 7, (3, 2), stride=(2, 1), padding=(1, 0)),
    )
    merged.fc = nn.Linear(7 * 4 * 6, 3)
    if cls is Untraceable:
        merged.__class__ = Untraceable
    gen = torch.Generator().manual_seed(1)
    return sources, merged.eval(), [torch.randn(16, 2, 8, 7, generator=gen) for _ in range(3)]


@pytest.mark.parametrize("min_rows", [1, 10**9], ids=["shifted-windows", "patch-rows"])
def test_refit_matches_the_float64_reference(min_rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both ways to form the sums (shifted windows for stride-1 convs, unfolded rows) give the reference."""
    monkeypatch.setattr(patch_gram, "SHIFT_MIN_ROWS", min_rows)
    graph, tr = graph_and_transforms()
    sources, merged, data = sources_and_merged(ResNetLike)
    ref = copy.deepcopy(merged)
    reference_refit(ref, sources, graph, tr, data, ridge=1e-4)
    ls.least_squares_refit(merged, sources, graph, tr, data, ridge=1e-4)
    assert ls.layer_runner(merged, data).__class__ is ls._Stepper
    for key, want in ref.state_dict().items():
        got = merged.state_dict()[key]
        assert (got - want).norm() / want.norm() < 1e-5, key


def test_untraceable_models_fall_back_to_replay_with_the_same_result() -> None:
    graph, tr = graph_and_transforms()
    sources, merged, data = sources_and_merged(Untraceable)
    assert isinstance(ls.layer_runner(merged, data), ls._Replay)
    ref = copy.deepcopy(merged)
    reference_refit(ref, sources, graph, tr, data, ridge=1e-3)
    ls.least_squares_refit(merged, sources, graph, tr, data, ridge=1e-3)
    for key, want in ref.state_dict().items():
        assert (merged.state_dict()[key] - want).norm() / want.norm() < 1e-5, key
    assert not hasattr(merged, "_tensor_constant0")


def test_refitting_a_model_against_itself_returns_its_weights_and_leaves_it_untouched() -> None:
    torch.manual_seed(3)
    net = ResNetLike().eval()
    graph = MergeGraph([], [], [], {})  # no merge points: every target is the mean of the (equal) sources
    data = [torch.randn(96, 2, 8, 7) for _ in range(2)]
    merged = copy.deepcopy(net)
    with torch.no_grad():
        for p in merged.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ls.least_squares_refit(merged, [net, net], graph, {}, data, ridge=0.0)
    for key, want in net.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], want, rtol=1e-4, atol=1e-5)
    assert set(vars(net)) == set(vars(copy.deepcopy(net)))  # tracing stored no constants on the model


def test_chunking_does_not_change_the_sums(monkeypatch) -> None:
    graph, tr = graph_and_transforms()
    sources, merged, data = sources_and_merged(ResNetLike)
    whole = copy.deepcopy(merged)
    ls.least_squares_refit(whole, sources, graph, tr, data)
    monkeypatch.setattr(ls, "CHUNK_ROWS", 7)  # one image (or a few Linear rows) per block
    ls.least_squares_refit(merged, sources, graph, tr, data)
    for key, want in whole.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], want, rtol=1e-9, atol=1e-10)


def test_max_batches_must_be_positive() -> None:
    sources, merged, data = sources_and_merged(ResNetLike)
    graph, tr = graph_and_transforms()
    with pytest.raises(ValueError, match="max_batches must be a positive int or None, got 0"):
        ls.least_squares_refit(merged, sources, graph, tr, data, max_batches=0)
