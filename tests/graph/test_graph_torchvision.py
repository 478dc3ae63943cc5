"""Merge graphs of torchvision models (random weights, never downloaded): equivalence in float64."""

from __future__ import annotations

import pytest
import torch

from lightning_merge.graph import check_equivalence, trace_graph

tv = pytest.importorskip("torchvision")
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_resnet18() -> None:
    model = tv.models.resnet18(weights=None)
    graph = trace_graph(model, X)
    # 4 residual streams (one per stage) + 8 inner conv spaces; the fc output is fixed
    assert [s.size for s in graph.spaces] == [64, 64, 64, 128, 128, 128, 256, 256, 256, 512, 512, 512]
    assert graph.space("conv1").members[0].param == "conv1.weight"
    assert not any(m.param == "fc.weight" and m.axis == 0 for s in graph.spaces for m in s.members)
    assert len(graph.cut_points) == 9  # stem + 7 block outputs + the flattened features
    assert check_equivalence(model, graph, X) < 1e-12


def test_resnet50() -> None:
    model = tv.models.resnet50(weights=None)
    graph = trace_graph(model, X)
    # the stem (its 64 channels meet layer1.0's downsample conv), 4 stage streams (256..2048) and
    # 2 inner spaces in each of the 16 bottlenecks
    assert len(graph.spaces) == 1 + 4 + 2 * 16
    assert [s.size for s in graph.spaces[:5]] == [64, 64, 64, 256, 64]
    assert sorted({s.size for s in graph.spaces}) == [64, 128, 256, 512, 1024, 2048]
    assert check_equivalence(model, graph, X) < 1e-12


def test_vgg11_bn_flatten_inner() -> None:
    model = tv.models.vgg11_bn(weights=None)
    graph = trace_graph(model, X)
    assert [s.size for s in graph.spaces] == [64, 128, 256, 256, 512, 512, 512, 512, 4096, 4096]
    last = graph.space("features.25")
    fc_in = next(m for m in last.members if m.param == "classifier.0.weight")
    assert (fc_in.axis, fc_in.inner) == (1, 49)  # flatten of (512, 7, 7)
    tap = next(t for t in graph.taps if t.module == "classifier.0")
    assert tap.inner == 49 and tap.channel_dim == -1
    assert check_equivalence(model, graph, X) < 1e-12


def test_vit_b_16() -> None:
    model = tv.models.vit_b_16(weights=None)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    graph = trace_graph(model, x)
    # 1 residual stream + per layer (12) one attention space and one MLP hidden space
    assert len(graph.spaces) == 25
    attn = [s for s in graph.spaces if s.name.endswith("self_attention.attn")]
    assert len(attn) == 12 and all(s.size == 768 and s.group_size == 64 for s in attn)
    assert check_equivalence(model, graph, x) < 1e-10


def test_the_check_also_runs_the_merge_path() -> None:
    """A permutation cannot see how the merge reads a graph; the merge stage refuses what it cannot apply."""
    import dataclasses

    from lightning_merge.graph import MergeGraph, Space

    model = tv.models.resnet18(weights=None).eval()
    graph = trace_graph(model, X)
    space = graph.space("layer1.0.conv1")
    wrong = [
        dataclasses.replace(m, role="out") if m.param == "layer1.0.conv2.weight" else m for m in space.members
    ]
    bad = MergeGraph(
        [Space(s.name, s.size, wrong) if s.name == space.name else s for s in graph.spaces],
        graph.taps,
        [],
        {},
    )
    from lightning_merge.apply.twin import check_equivalence as full_check

    assert check_equivalence(model, bad, X) < 1e-12  # as a permutation it is still a symmetry
    with pytest.raises(ValueError, match="several output axes"):
        full_check(model, bad, X)


def test_convnext_layernorm2d_and_layer_scale_join_the_channel_space() -> None:
    """LayerNorm2d subclasses nn.LayerNorm but normalises NCHW channels: traced into, not the LN rule."""
    model = tv.models.convnext_tiny(weights=None).eval()
    graph = trace_graph(model, X)
    stem = graph.space("features.0.0")
    params = {m.param for m in stem.members}
    assert {"features.0.1.weight", "features.0.1.bias", "features.1.0.layer_scale"} <= params
    assert check_equivalence(model, graph, X) < 1e-12


def test_grouped_convolutions_keep_both_sides_fixed() -> None:
    model = tv.models.resnext50_32x4d(weights=None).eval()
    graph = trace_graph(model, X)
    tagged = {(m.param, m.axis) for s in graph.spaces for m in s.members}
    conv = "layer1.0.conv{}.weight".format
    assert not {(conv(2), 0), (conv(2), 1)} & tagged  # groups=32: never permuted
    # conv1 reads the stem (axis 1) but its output feeds the grouped conv: fixed; conv3 reads it
    assert (conv(1), 1) in tagged and (conv(1), 0) not in tagged
    assert (conv(3), 0) in tagged and (conv(3), 1) not in tagged
    assert check_equivalence(model, graph, X) < 1e-12


def test_mnasnet_merged_state_dict_keeps_module_versions() -> None:
    """MNASNet refuses a state dict without its version metadata; the check's merge stage loads one."""
    model = tv.models.mnasnet0_5(weights=None).eval()
    graph = trace_graph(model, X)
    assert check_equivalence(model, graph, X) < 1e-12
