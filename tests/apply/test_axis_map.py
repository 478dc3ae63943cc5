"""Sparse axis maps (PLeaS' refit): on a flattened axis (inner = 36 positions per channel) model i's
map is M_i ⊗ I_36 exactly, ``apply_joint`` is Σ_i of the dense products, and the triplets hold only
the non-zero entries (a dense map of a 25088-wide axis was 10 GB)."""

from __future__ import annotations

import torch

from lightning_merge.apply.axis_map import axis_map
from lightning_merge.match.transform import from_assignment
from tests.stats_nets import ConvNet, conv_graph


def transforms() -> dict:
    # c1: identity-like zip of 4 + 4 features into 4; c2: 6 + 6 into 9 (3 matched pairs, 6 kept apart)
    c1 = from_assignment(torch.tensor([0, 1, 2, 3, 1, 0, 3, 2]), 4, 2)
    c2 = from_assignment(torch.tensor([0, 1, 2, 3, 4, 5, 2, 6, 0, 7, 8, 1]), 9, 2)
    return {"c1": c1, "c2": c2}


def test_a_flattened_axis_maps_channels_kron_its_positions() -> None:
    graph, ts = conv_graph(ConvNet()), transforms()
    amap = axis_map(graph, "fc.weight", 1, 6 * 36, ts, 2)
    assert (amap.new_length, amap.length) == (9 * 36, 6 * 36)
    for i in range(2):
        want = torch.kron(ts["c2"].merge_block(i).double(), torch.eye(36, dtype=torch.float64))
        assert torch.equal(amap.dense(i), want)
        assert amap.vals[i].numel() == int((want != 0).sum())
    owners = amap.owners()
    assert owners.shape == (2, 9 * 36) and bool(owners.any(0).all())
    assert int(owners.all(0).sum()) == 3 * 36  # the three matched channels belong to both models


def test_apply_joint_is_the_sum_of_the_dense_products() -> None:
    graph, ts = conv_graph(ConvNet()), transforms()
    amap = axis_map(graph, "conv2.weight", 1, 4, ts, 2)  # c1 on a 3×3 conv's input: k = 9
    z = torch.randn(2 * 4 * 9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = sum(
        torch.kron(amap.dense(i), torch.eye(9, dtype=torch.float64)) @ z[i * 36 : (i + 1) * 36]
        for i in range(2)
    )
    torch.testing.assert_close(amap.apply_joint(z, 9), want, rtol=1e-14, atol=1e-14)


def test_an_axis_in_no_merge_point_is_averaged() -> None:
    graph, ts = conv_graph(ConvNet()), transforms()
    amap = axis_map(graph, "conv1.weight", 1, 1, ts, 2)  # the image channel
    for i in range(2):
        assert torch.equal(amap.dense(i), torch.full((1, 1), 0.5, dtype=torch.float64))
