"""Merge graph: structure of the traced graphs, the equivalence self-check, errors, manual overrides."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_merge.graph import (
    AxisRef,
    EquivalenceError,
    GraphError,
    MergeGraph,
    Space,
    UnsupportedOpError,
    apply_overrides,
    check_compatible,
    check_equivalence,
    fix_space,
    join_spaces,
    load_graph,
    permute_model,
    random_permutations,
    save_graph,
    trace_graph,
)
from lightning_merge.graph.__main__ import main as graph_cli
from lightning_merge.graph.handlers import passthrough
from lightning_merge.models import build_model

IMG = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
SMALL = IMG[:, :, :12, :12]  # convolutional nets accept any size: keep the float64 checks fast


@pytest.fixture(scope="module")
def r20() -> tuple[nn.Module, MergeGraph]:
    """ResNet-20×1 and its traced graph, shared by the tests that only read them."""
    model = build_model("resnet20")
    return model, trace_graph(model, SMALL)


def member_params(graph: MergeGraph) -> set[tuple[str, int]]:
    return {(m.param, m.axis) for s in graph.spaces for m in s.members}


class Block(nn.Module):
    """Pre-norm transformer encoder block: LN → MHA → add → LN → MLP → add."""

    def __init__(self, dim: int, heads: int, batch_first: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    def __init__(self, batch_first: bool = True, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(12, dim)
        self.blocks = nn.Sequential(Block(dim, heads, batch_first), Block(dim, heads, batch_first))
        self.head = nn.Linear(dim, 5)
        self.token_dim = 1 if batch_first else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(self.token_dim))


# ---------------------------------------------------------------- project models


@pytest.mark.parametrize("width", [1, 2])
@pytest.mark.parametrize("head", ["embedding", "linear"])
def test_resnet20_structure_and_equivalence(width: int, head: str) -> None:
    model = build_model("resnet20", width=width, head=head)
    graph = trace_graph(model, SMALL)
    # per stage: one residual stream (joined across its blocks by the adds) + 3 inner conv spaces
    assert [s.size for s in graph.spaces] == [16 * width] * 4 + [32 * width] * 4 + [64 * width] * 4
    streams = [s for s in graph.spaces if any("bn2" in m.param for m in s.members)]
    assert [s.name for s in streams] == ["conv1", "layer2.0.conv2", "layer3.0.conv2"]
    stage2 = {m.param for m in graph.space("layer2.0.conv2").members}
    assert {"layer2.0.shortcut.0.weight", "layer2.1.bn2.running_var", "layer3.0.shortcut.0.weight"} <= stage2
    inner = [s for s in graph.spaces if s not in streams]
    assert [s.name for s in inner] == [f"layer{i}.{j}.conv1" for i in (1, 2, 3) for j in range(3)]
    assert all(len(s.members) == 6 for s in inner)  # conv1 out, bn1 ×4, conv2 in
    # the head's output axis and the frozen class embedding are in no space
    params = member_params(graph)
    fc = "head.fc" if head == "linear" else "head.proj"
    assert (f"{fc}.weight", 1) in params and (f"{fc}.weight", 0) not in params
    assert not any(p.startswith("head.classes") or p == f"{fc}.bias" for p, _ in params)
    # 18 distinct conv inputs + the head (each shortcut shares its block's input): one tap each
    assert len(graph.taps) == 19
    assert check_equivalence(model, graph, SMALL) < 1e-12


def test_resnet20_cut_points(r20) -> None:
    graph = r20[1]
    nodes = [c.node for c in graph.cut_points]
    assert nodes[0] == "relu" and nodes[-1] == "flatten"
    assert nodes[1:-1] == [f"layer{i}_{j}_relu2" for i in (1, 2, 3) for j in range(3)][:-1]
    depths = [c.depth for c in graph.cut_points]
    assert depths == sorted(depths) and depths[-1] == 1.0
    assert [c.space for c in graph.cut_points][4] == "layer2.0.conv2"


@pytest.mark.parametrize("arch", ["mlp", "vgg11_bn"])
@pytest.mark.parametrize("head", ["embedding", "linear"])
def test_mlp_vgg_equivalence(arch: str, head: str) -> None:
    model = build_model(arch, head=head, width=0.25)
    x = IMG if arch == "mlp" else SMALL
    graph = trace_graph(model, x)
    expected = [128] * 3 if arch == "mlp" else [16, 32, 64, 64, 128, 128, 128, 128]
    assert [s.size for s in graph.spaces] == expected
    assert len(graph.cut_points) == len(expected)
    assert check_equivalence(model, graph, x) < 1e-12


def test_trace_leaves_model_untouched() -> None:
    model = build_model("resnet20").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = trace_graph(model, SMALL)
    check_equivalence(model, graph, SMALL)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- transformers


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_block(batch_first: bool) -> None:
    model = TinyTransformer(batch_first)
    x = torch.randn(3, 7, 12) if batch_first else torch.randn(7, 3, 12)
    graph = trace_graph(model, x)
    assert [(s.name, s.size, s.group_size) for s in graph.spaces] == [
        ("embed", 32, 1),
        ("blocks.0.attn.attn", 32, 8),
        ("blocks.0.mlp.0", 64, 1),
        ("blocks.1.attn.attn", 32, 8),
        ("blocks.1.mlp.0", 64, 1),
    ]
    attn = graph.space("blocks.0.attn.attn")
    qkv = next(m for m in attn.members if m.param == "blocks.0.attn.in_proj_weight")
    assert (qkv.axis, qkv.outer, qkv.outer_stride) == (0, 3, 32)
    stream = {(m.param, m.axis, m.role) for m in graph.space("embed").members}
    assert ("blocks.0.attn.out_proj.weight", 0, "out") in stream
    assert ("blocks.1.attn.in_proj_weight", 1, "in") in stream
    kinds = [(t.module, t.kind) for t in graph.taps if t.module == "blocks.0.attn"]
    assert kinds == [("blocks.0.attn", "input"), ("blocks.0.attn", "attention")]
    assert all(t.channel_dim == -1 for t in graph.taps)
    assert check_equivalence(model, graph, x) < 1e-12


def test_small_vision_transformer() -> None:
    tv = pytest.importorskip("torchvision")
    model = tv.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128
    )
    x = torch.randn(2, 3, 32, 32)
    graph = trace_graph(model, x)
    assert [s.group_size for s in graph.spaces if s.name.endswith(".attn")] == [16, 16]
    stream = {(m.param, m.axis) for m in graph.space("conv_proj").members}
    assert {("class_token", 2), ("encoder.pos_embedding", 2), ("heads.head.weight", 1)} <= stream
    assert ("heads.head.weight", 0) not in member_params(graph)
    assert check_equivalence(model, graph, x) < 1e-12


# ---------------------------------------------------------------- the check detects broken graphs


def _drop_member(graph: MergeGraph, param: str) -> MergeGraph:
    g = MergeGraph.from_dict(graph.to_dict())
    for s in g.spaces:
        s.members = [m for m in s.members if m.param != param]
    return g


def test_check_detects_missing_member(r20) -> None:
    model, graph = r20
    with pytest.raises(EquivalenceError, match="output"):
        check_equivalence(model, _drop_member(graph, "layer1.1.bn1.running_mean"), SMALL)


def test_check_detects_split_residual_stream(r20) -> None:
    model, graph = r20
    g = MergeGraph.from_dict(graph.to_dict())
    stream = g.space("layer2.0.conv2")
    later = [m for m in stream.members if m.param.startswith(("layer2.2", "layer3"))]
    stream.members = [m for m in stream.members if m not in later]
    g.spaces.append(Space("split", stream.size, later))
    with pytest.raises(EquivalenceError):
        check_equivalence(model, g, SMALL)


def test_check_detects_heads_cut_apart() -> None:
    model = TinyTransformer()
    x = torch.randn(3, 7, 12)
    g = MergeGraph.from_dict(trace_graph(model, x).to_dict())
    g.space("blocks.0.attn.attn").group_size = 1  # features may now move between heads
    with pytest.raises(EquivalenceError):
        check_equivalence(model, g, x)


def test_constant_tensors_are_randomized_so_forgotten_bn_stats_show() -> None:
    model = build_model("vgg11_bn", width=0.25)
    graph = _drop_member(trace_graph(model, SMALL), "features.1.running_var")
    assert check_equivalence(model, graph, SMALL, randomize=False) < 1e-12  # var = 1 hides the bug
    with pytest.raises(EquivalenceError):
        check_equivalence(model, graph, SMALL)


def test_permute_model_is_a_symmetry_and_validates() -> None:
    model = build_model("mlp", width=0.25).double().eval()
    graph = trace_graph(model, IMG.double())
    perms = random_permutations(graph, seed=3)
    w = model.layers[0].weight.detach().clone()
    permute_model(model, graph, perms)
    assert torch.equal(model.layers[0].weight, w[perms["layers.0"]])
    with pytest.raises(ValueError, match="layers.0"):
        permute_model(model, graph, {"layers.0": torch.arange(5)})
    bad = MergeGraph([Space("s", 4, [AxisRef("nope", 0, "out")])], [], [], {})
    with pytest.raises(KeyError, match="nope"):
        permute_model(model, bad, {"s": torch.arange(4)})


# ---------------------------------------------------------------- errors


class FFTModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.fft.fft(self.conv(x)).real.mean((2, 3)))


class GroupedConv(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, groups=groups)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(self.a(x)).mean((2, 3)))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.sum() > 0 else self.conv(-x)


def test_unsupported_op_names_op_and_node() -> None:
    with pytest.raises(UnsupportedOpError, match=r"fft_fft.*fx node 'fft_fft'.*register_handler") as e:
        trace_graph(FFTModel(), torch.randn(1, 3, 8, 8))
    assert e.value.node == "fft_fft"


def test_grouped_conv_fixed_depthwise_supported() -> None:
    x = torch.randn(1, 3, 8, 8)
    grouped = GroupedConv(2)  # conv a's output feeds groups of b: both sides stay fixed (no space)
    assert trace_graph(grouped, x).spaces == []
    model = GroupedConv(4)  # depthwise: keeps conv a's space
    graph = trace_graph(model, x)
    assert [s.name for s in graph.spaces] == ["a"]
    assert ("b.weight", 0) in member_params(graph)
    assert check_equivalence(model, graph, x) < 1e-12


def test_untraceable_model_and_custom_leaf_handler() -> None:
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(GraphError, match="could not trace DataDependent.*by hand"):
        trace_graph(DataDependent(), x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.odd, self.fc = nn.Conv2d(3, 4, 3), DataDependentAct(), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.odd(self.conv(x)).mean((2, 3)))

    with pytest.raises(GraphError):
        trace_graph(Net(), x)
    model = Net()
    graph = trace_graph(model, x, handlers={DataDependentAct: passthrough})
    assert [s.name for s in graph.spaces] == ["conv"]
    assert check_equivalence(model, graph, x) < 1e-12


class DataDependentAct(nn.Module):
    """Elementwise, but with Python control flow on values (fx cannot trace it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) if x.mean() > 0 else torch.tanh(x)


def test_space_read_by_no_consumer_is_an_error() -> None:
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).amax(1) + self.conv.weight.sum()

    with pytest.raises(GraphError, match=r"\['conv'\].*no Conv/Linear"):
        trace_graph(Bad(), torch.randn(1, 3, 8, 8))


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        trace_graph("resnet", IMG)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tensor"):
        trace_graph(build_model("mlp"), [IMG])  # type: ignore[arg-type]


def test_check_compatible_names_first_difference() -> None:
    a, b = build_model("resnet20"), build_model("resnet20")
    check_compatible([a, b])
    with pytest.raises(ValueError, match=r"model 2: parameter 'conv1.weight' has shape"):
        check_compatible([a, b, build_model("resnet20", width=2)])
    with pytest.raises(ValueError, match=r"model 1 has no parameter 'conv1.weight'"):
        check_compatible([a, build_model("mlp")])
    with pytest.raises(ValueError, match="no models"):
        check_compatible([])


# ---------------------------------------------------------------- manual graphs


def test_json_round_trip(tmp_path) -> None:
    model = TinyTransformer()
    graph = trace_graph(model, torch.randn(3, 7, 12))
    path = tmp_path / "g.json"
    save_graph(graph, path)
    loaded = load_graph(path)
    assert loaded == graph and loaded.digest() == graph.digest()
    assert MergeGraph.from_dict(json.loads(json.dumps(graph.to_dict()))) == graph
    (tmp_path / "bad.json").write_text('{"spaces": [{"size": 3}]}')
    with pytest.raises(ValueError, match="bad.json"):
        load_graph(tmp_path / "bad.json")


def test_overrides_fix_and_join(r20) -> None:
    model, graph = r20
    fixed = fix_space(graph, "layer1.0.conv1")
    assert "layer1.0.conv1" not in [s.name for s in fixed.spaces]
    assert all(seg.space != "layer1.0.conv1" for t in fixed.taps for seg in t.segments)
    assert check_equivalence(model, fixed, SMALL) < 1e-12  # fixing is always safe
    joined = join_spaces(graph, "layer1.0.conv1", "layer1.1.conv1")
    assert len(joined.space("layer1.0.conv1").members) == 12 and len(joined.spaces) == 11
    assert {seg.space for t in joined.taps for seg in t.segments} == {s.name for s in joined.spaces}
    same = trace_graph(model, SMALL, overrides={"join": [["layer1.0.conv1", "layer1.1.conv1"]]})
    assert same == joined
    assert apply_overrides(graph, {"fix": ["layer1.0.conv1"]}) == fixed
    with pytest.raises(ValueError, match="16 features but 'layer2.0.conv1' has 32"):
        join_spaces(graph, "layer1.0.conv1", "layer2.0.conv1")
    with pytest.raises(KeyError, match="no merge point named 'nope'"):
        fix_space(graph, "nope")
    with pytest.raises(KeyError, match="split"):
        apply_overrides(graph, {"split": []})


def test_cli_prints_resnet20(capsys) -> None:
    graph_cli(["resnet20", "--width", "1"])
    out = capsys.readouterr().out
    assert "12 merge points" in out and "layer2.0.shortcut.0.weight:0:out" in out and "19 taps" in out


# ---------------------------------------------------------------- op coverage


class OpZoo(nn.Module):
    """GroupNorm, channel cat with a fixed input, permute + LayerNorm, flatten with inner, SE-style mul."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.mix = nn.Conv2d(15, 6, 1)
        self.ln = nn.LayerNorm(6)
        self.gate = nn.Linear(6, 6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.gn(self.a(x)), x, F.silu(self.b(x))], dim=1)  # 8 + 3 (fixed) + 4
        y = self.mix(h)
        y = self.ln(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = y * torch.sigmoid(self.gate(y.mean((2, 3))))[:, :, None, None]
        return self.fc(F.adaptive_avg_pool2d(y, 4).flatten(1))


def test_op_zoo() -> None:
    model = OpZoo()
    x = torch.randn(2, 3, 8, 8)
    graph = trace_graph(model, x)
    assert [(s.name, s.size, s.group_size) for s in graph.spaces] == [("a", 8, 4), ("b", 4, 1), ("mix", 6, 1)]
    mix_in = {(m.param, m.offset, m.role) for s in graph.spaces for m in s.members if m.param == "mix.weight"}
    assert mix_in == {("mix.weight", 0, "in"), ("mix.weight", 11, "in"), ("mix.weight", 0, "out")}
    tap = next(t for t in graph.taps if t.module == "mix")
    assert [(g.space, g.offset, g.size) for g in tap.segments] == [("a", 0, 8), ("b", 11, 4)]
    fc = next(m for m in graph.space("mix").members if m.param == "fc.weight")
    assert fc.inner == 16
    assert ("gate.weight", 0) in member_params(graph)  # the gate's output joins "mix" through the mul
    assert check_equivalence(model, graph, x) < 1e-12


class FunctionalConv(nn.Module):
    """A layer fx would trace into ``F.conv2d`` (no handler): a custom handler makes it a leaf."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.out_channels = cout
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) / 3)
        self.bias = nn.Parameter(torch.randn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=1)


def test_custom_layer_is_one_handler_entry() -> None:
    from lightning_merge.graph.handlers import consume, produce

    def functional_conv(op):
        consume(op, op.lay(0))
        return produce(op, op.module.out_channels, ("weight", "bias"), dim=1, ndim=op.out.dim())

    model = nn.Sequential(
        FunctionalConv(3, 6), nn.ReLU(), FunctionalConv(6, 5), nn.ReLU(), FunctionalConv(5, 2)
    )
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(UnsupportedOpError, match="conv2d"):
        trace_graph(model, x)
    graph = trace_graph(model, x, handlers={FunctionalConv: functional_conv})
    assert [(s.name, s.size, len(s.members)) for s in graph.spaces] == [("0", 6, 3), ("2", 5, 3)]
    assert check_equivalence(model, graph, x) < 1e-12


class SplitNet(nn.Module):
    """Splits along a spatial axis (chunk, unbind) keep conv a's features; splitting conv b's output
    on the channel axis (split) pairs particular features, so b stays fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 6, 3), nn.Conv2d(3, 5, 1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        top, bottom = y.chunk(2, dim=2)
        y = torch.stack(torch.cat([bottom, top], 2).unbind(3), dim=3)
        p, q = torch.split(torch.relu(self.b(y)), 3, dim=1)
        return self.fc(torch.relu(self.c(p * q)).mean((2, 3)))


def test_split_chunk_unbind() -> None:
    model, x = SplitNet(), torch.randn(2, 3, 10, 10)
    graph = trace_graph(model, x)
    assert [s.name for s in graph.spaces] == ["a", "c"]
    assert check_equivalence(model, graph, x) < 1e-12
