"""Small networks with hand-written merge graphs for the statistics tests (and the DDP script)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lightning_merge.graph import permute_model, random_permutations
from lightning_merge.graph.spec import AxisRef, MergeGraph, Segment, Space, Tap


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if v.dim() > 0}


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def mlp_graph(model: MLP) -> MergeGraph:
    spaces = [
        Space("h1", 16, [AxisRef("fc1.weight", 0, "out"), AxisRef("fc2.weight", 1, "in")]),
        Space("h2", 12, [AxisRef("fc2.weight", 0, "out"), AxisRef("fc3.weight", 1, "in")]),
    ]
    taps = [Tap("fc2", -1, (Segment("h1", 0, 16),)), Tap("fc3", -1, (Segment("h2", 0, 12),))]
    return MergeGraph(spaces, taps, [], _shapes(model))


class ConvNet(nn.Module):
    """conv(1→4) → BN → ReLU → conv(4→6) → ReLU → flatten → linear: conv taps and a flattened tap."""

    def __init__(self, size: int = 6) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * size * size, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(h)).flatten(1))


def conv_graph(model: ConvNet, size: int = 6, pool_bn: bool = False) -> MergeGraph:
    spaces = [
        Space("c1", 4, [AxisRef("conv1.weight", 0, "out"), AxisRef("conv2.weight", 1, "in")]),
        Space("c2", 6, [AxisRef("conv2.weight", 0, "out"), AxisRef("fc.weight", 1, "in", inner=size**2)]),
    ]
    taps = [
        Tap("conv2", 1, (Segment("c1", 0, 4),)),
        Tap("fc", 1, (Segment("c2", 0, 6),), inner=size * size),
    ]
    if pool_bn:
        taps.append(Tap("bn1", 1, (Segment("c1", 0, 4),)))
    return MergeGraph(spaces, taps, [], _shapes(model))


class CatNet(nn.Module):
    """Two branches concatenated into one Linear: one tap with two segments."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(4, 3), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], dim=-1))


def cat_graph(model: CatNet) -> MergeGraph:
    spaces = [Space("sa", 5), Space("sb", 3)]
    taps = [Tap("c", -1, (Segment("sa", 0, 5), Segment("sb", 5, 3)))]
    return MergeGraph(spaces, taps, [], _shapes(model))


class AttnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        return self.attn(h, h, h, need_weights=False)[0]


def attn_graph(model: AttnNet) -> MergeGraph:
    spaces = [Space("qkv", 8, group_size=4)]
    taps = [Tap("attn", -1, (Segment("qkv", 0, 8),), kind="attention")]
    return MergeGraph(spaces, taps, [], _shapes(model))


def make_models(cls: type[nn.Module], n: int = 2, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    models = [cls() for _ in range(n)]
    for m in models:  # non-trivial BatchNorm running statistics
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return models


def seq_mlp(seed: int) -> nn.Sequential:
    """A float64 6-10-12-3 MLP for the matching tests (hand-written graph: ``seq_mlp_graph``)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 3)).double()


def seq_mlp_graph(model: nn.Module, group_size: int = 1) -> MergeGraph:
    """``seq_mlp``'s two hidden spaces; ``group_size`` makes h2's features move in whole groups."""
    spaces = [
        Space(
            "h1",
            10,
            [AxisRef("0.weight", 0, "out"), AxisRef("0.bias", 0, "out"), AxisRef("2.weight", 1, "in")],
        ),
        Space(
            "h2",
            12,
            [AxisRef("2.weight", 0, "out"), AxisRef("2.bias", 0, "out"), AxisRef("4.weight", 1, "in")],
            group_size=group_size,
        ),
    ]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return MergeGraph(spaces=spaces, taps=[], cut_points=[], param_shapes=shapes)


def permuted_twin(model: nn.Module, graph: MergeGraph, seed: int) -> tuple[nn.Module, dict]:
    """A copy of ``model`` with every space of ``graph`` randomly permuted, and those permutations."""
    perms = random_permutations(graph, seed=seed)
    return permute_model(copy.deepcopy(model), graph, perms), perms
