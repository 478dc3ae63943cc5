"""Applying transforms to weights, merged modules, partial zips, BatchNorm reset and least squares.

Hand-written merge graphs on small nets (conv + BatchNorm + flatten → Linear), random permutations
and random dense transforms, each checked against an independent reference.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_merge.apply.batchnorm_reset import reset_batchnorm
from lightning_merge.apply.least_squares import least_squares_refit
from lightning_merge.apply.module import build_merged_module, resize_to_state_dict
from lightning_merge.apply.partial import PartialZipModel, build_partial, resolve_cut
from lightning_merge.apply.weights import merge_state_dicts
from lightning_merge.graph.spec import AxisRef, CutPoint, MergeGraph, Space
from lightning_merge.match.transform import SpaceTransform, from_assignment

BN_KEYS = ("weight", "bias", "running_mean", "running_var")


class Net(nn.Module):
    """conv → BN → ReLU → conv → BN → ReLU → flatten (C·16) → fc → ReLU → out."""

    def __init__(self, c: int = 4, h: int = 6) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.fc, self.out = nn.Linear(c * 16, h), nn.Linear(h, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.conv(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.out(torch.relu(self.fc(x.flatten(1))))


def net_graph(c: int = 4, h: int = 6) -> MergeGraph:
    a = [AxisRef("conv.weight", 0, "out"), AxisRef("conv.bias", 0, "out")]
    a += [AxisRef(f"bn.{k}", 0, "out") for k in BN_KEYS] + [AxisRef("conv2.weight", 1, "in")]
    b = [AxisRef("conv2.weight", 0, "out")] + [AxisRef(f"bn2.{k}", 0, "out") for k in BN_KEYS]
    b += [AxisRef("fc.weight", 1, "in", inner=16)]
    d = [AxisRef("fc.weight", 0, "out"), AxisRef("fc.bias", 0, "out"), AxisRef("out.weight", 1, "in")]
    cuts = [CutPoint("relu", "a", 1, 1 / 3), CutPoint("relu_2", "d", 1, 1.0)]
    return MergeGraph([Space("a", c, a), Space("b", c, b), Space("d", h, d)], [], cuts, {})


def random_net(seed: int) -> Net:
    torch.manual_seed(seed)
    net = Net().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
    return net


def permuted_copy(net: Net, graph: MergeGraph, perms: dict[str, torch.Tensor]) -> Net:
    """Feature k of the copy is feature perms[space][k] of ``net`` (a function-preserving permutation)."""
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    for space in graph.spaces:
        for ref in space.members:
            pos = ref.positions(space.size)
            src = pos[perms[space.name]].flatten()
            sd[ref.param] = sd[ref.param].index_copy(
                ref.axis, pos.flatten(), sd[ref.param].index_select(ref.axis, src)
            )
    return build_merged_module(net, sd)


def align_to_copy(graph: MergeGraph, perms: dict[str, torch.Tensor]) -> dict[str, SpaceTransform]:
    return {
        s.name: from_assignment(torch.cat([torch.arange(s.size), perms[s.name]]), s.size, 2)
        for s in graph.spaces
    }


def concat(graph: MergeGraph, num: int) -> dict[str, SpaceTransform]:
    """No fusion at all: merged width N·n, the merged model is the ensemble."""
    return {s.name: from_assignment(torch.arange(num * s.size), num * s.size, num) for s in graph.spaces}


@pytest.fixture
def setup() -> tuple[Net, Net, MergeGraph, dict[str, torch.Tensor]]:
    net, graph = random_net(0), net_graph()
    gen = torch.Generator().manual_seed(1)
    perms = {s.name: torch.randperm(s.size, generator=gen) for s in graph.spaces}
    return net, permuted_copy(net, graph, perms), graph, perms


X = torch.randn(7, 1, 4, 4, generator=torch.Generator().manual_seed(2))


def test_permuted_copy_is_the_same_function(setup) -> None:
    net, copy_, _, _ = setup
    assert not torch.equal(net.conv.weight, copy_.conv.weight)
    torch.testing.assert_close(copy_(X), net(X), rtol=1e-5, atol=1e-6)


def test_merging_with_aligned_permuted_copy_recovers_the_model(setup) -> None:
    net, copy_, graph, perms = setup
    merged_sd = merge_state_dicts([net.state_dict(), copy_.state_dict()], graph, align_to_copy(graph, perms))
    for k, v in net.state_dict().items():
        torch.testing.assert_close(merged_sd[k], v, rtol=1e-6, atol=1e-6, msg=k)
    assert merged_sd["bn.num_batches_tracked"].dtype == torch.long


def test_width_n_times_N_is_the_ensemble_for_three_models() -> None:
    nets, graph = [random_net(s) for s in range(3)], net_graph()
    merged = build_merged_module(
        nets[0], merge_state_dicts([n.state_dict() for n in nets], graph, concat(graph, 3))
    )
    assert (
        merged.conv.out_channels == 12 and merged.bn.num_features == 12 and merged.fc.in_features == 12 * 16
    )
    assert merged.fc.weight.shape == (18, 192) and merged.out.in_features == 18
    torch.testing.assert_close(merged(X), sum(n(X) for n in nets) / 3, rtol=1e-5, atol=1e-6)
    assert nets[0].conv.weight.shape == (4, 1, 3, 3)  # sources untouched


def dense_transform(n: int, m: int, num: int, seed: int) -> SpaceTransform:
    """Random non-negative M and U (non-negative so merged BatchNorm variances stay positive)."""
    g = torch.Generator().manual_seed(seed)
    return SpaceTransform(
        torch.rand(m, num * n, generator=g, dtype=torch.float64),
        torch.rand(num * n, m, generator=g, dtype=torch.float64),
        num,
    )


def test_fused_qkv_rows_and_concatenated_inputs_match_blockwise_reference() -> None:
    """outer=3 (q, k, v rows of one space) on axis 0, two spaces side by side (cat) on axis 1."""
    e, na, nb, num = 4, 3, 5, 2
    graph = MergeGraph(
        [
            Space("e", e, [AxisRef("w", 0, "out", outer=3)]),
            Space("a", na, [AxisRef("w", 1, "in")]),
            Space("b", nb, [AxisRef("w", 1, "in", offset=na)]),
        ],
        [],
        [],
        {},
    )
    tr = {
        "e": dense_transform(e, 6, num, 0),
        "a": dense_transform(na, 5, num, 1),
        "b": dense_transform(nb, 7, num, 2),
    }
    ws = [torch.randn(3 * e, na + nb, dtype=torch.float64) for _ in range(num)]
    got = merge_state_dicts([{"w": w} for w in ws], graph, tr)["w"]
    ref = sum(
        torch.cat(
            [
                torch.cat(
                    [
                        tr["e"].merge_block(i) @ w[q * e : (q + 1) * e, :na] @ tr["a"].unmerge_block(i),
                        tr["e"].merge_block(i) @ w[q * e : (q + 1) * e, na:] @ tr["b"].unmerge_block(i),
                    ],
                    1,
                )
                for q in range(3)
            ]
        )
        for i, w in enumerate(ws)
    )
    assert got.shape == (18, 12)
    torch.testing.assert_close(got, ref)


def test_fixed_axes_are_averaged_and_untagged_tensors_too() -> None:
    graph = MergeGraph([Space("h", 3, [AxisRef("head", 1, "in")])], [], [], {})
    tr = {"h": dense_transform(3, 4, 2, 0)}
    sds = [
        {"head": torch.randn(2, 3, dtype=torch.float64), "free": torch.randn(5, dtype=torch.float64)}
        for _ in range(2)
    ]
    got = merge_state_dicts(sds, graph, tr)
    ref = sum(sd["head"] @ tr["h"].unmerge_block(i) for i, sd in enumerate(sds)) / 2
    torch.testing.assert_close(got["head"], ref)
    torch.testing.assert_close(got["free"], (sds[0]["free"] + sds[1]["free"]) / 2)


def test_merge_errors_name_the_culprit(setup) -> None:
    net, copy_, graph, perms = setup
    sds, tr = [net.state_dict(), copy_.state_dict()], align_to_copy(graph, perms)
    with pytest.raises(KeyError, match="no transform for merge point 'b'"):
        merge_state_dicts(sds, graph, {k: v for k, v in tr.items() if k != "b"})
    with pytest.raises(ValueError, match="'d' has size 6 but its transform maps n=4"):
        merge_state_dicts(sds, graph, {**tr, "d": from_assignment(torch.arange(8) % 4, 4, 2)})
    with pytest.raises(KeyError, match=r"merge points \['zzz'\]"):
        merge_state_dicts(sds, graph, {**tr, "zzz": tr["a"]})
    with pytest.raises(ValueError, match="for 2 models, got 3 state dicts"):
        merge_state_dicts(sds + [net.state_dict()], graph, tr)
    with pytest.raises(KeyError, match="model 1 lacks 'out.bias'"):
        merge_state_dicts([sds[0], {k: v for k, v in sds[1].items() if k != "out.bias"}], graph, tr)
    bad = dict(sds[1]) | {"out.bias": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"model 1: 'out.bias' has shape \(4,\)"):
        merge_state_dicts([sds[0], bad], graph, tr)
    wrong = MergeGraph([Space("a", 4, [AxisRef("conv.weight", 5, "out")])], [], [], {})
    with pytest.raises(ValueError, match="'conv.weight' has 4 dims; the merge graph tags axis 5"):
        merge_state_dicts(sds, wrong, {"a": tr["a"]})


def test_resize_to_state_dict_rebuilds_a_saved_merged_model(tmp_path) -> None:
    nets, graph = [random_net(s) for s in range(2)], net_graph()
    merged = build_merged_module(
        nets[0], merge_state_dicts([n.state_dict() for n in nets], graph, concat(graph, 2))
    )
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, tmp_path / "m.safetensors")
    rebuilt = resize_to_state_dict(Net().eval(), load_file(tmp_path / "m.safetensors"))
    torch.testing.assert_close(rebuilt(X), merged(X))
    assert rebuilt.conv2.in_channels == 8 and rebuilt.bn2.num_features == 8
    with pytest.raises(KeyError, match="'nope.weight' is not a parameter"):
        resize_to_state_dict(Net(), {"nope.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="lacks parameter 'conv.weight'"):
        resize_to_state_dict(Net(), {"conv.bias": torch.zeros(4)})


def test_partial_zip_of_aligned_copies_gives_both_outputs(setup) -> None:
    net, copy_, graph, perms = setup
    tr = align_to_copy(graph, perms)
    for cut in ("relu", "relu_2", 0.4):
        model = build_partial([net, copy_], graph, tr, cut)
        out = model(X)
        assert isinstance(model, PartialZipModel) and len(out) == 2
        for o in out:
            torch.testing.assert_close(o, net(X), rtol=1e-5, atol=1e-6)
    assert resolve_cut(graph, 0.4).node == "relu" and resolve_cut(graph, 0.9).node == "relu_2"


def test_partial_zip_cut_at_the_end_equals_the_full_merge() -> None:
    """After the last cut only the linear head is left: the tails' mean is the fully merged model."""
    nets, graph = [random_net(s) for s in range(3)], net_graph()
    tr = {s.name: dense_transform(s.size, s.size + 1, 3, i) for i, s in enumerate(graph.spaces)}
    full = build_merged_module(nets[0], merge_state_dicts([n.state_dict() for n in nets], graph, tr))
    partial = build_partial(nets, graph, tr, "relu_2")
    outs = partial(X)
    assert len(outs) == 3
    torch.testing.assert_close(sum(outs) / 3, full(X), rtol=1e-4, atol=1e-4)
    with pytest.raises(KeyError, match="stop_at='nope' is not a cut point"):
        build_partial(nets, graph, tr, "nope")
    with pytest.raises(ValueError, match="depth fraction in"):
        build_partial(nets, graph, tr, 1.5)


def test_reset_batchnorm_pools_exact_statistics_and_restores_mode() -> None:
    net = random_net(0).train()
    net.bn2 = nn.Identity()  # one BatchNorm: its input does not depend on batch composition
    data = [torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    reset_batchnorm(net, [(x, torch.zeros(len(x))) for x in data])
    assert net.training
    feats = net.conv(torch.cat(data)).detach().double().transpose(0, 1).flatten(1)
    torch.testing.assert_close(net.bn.running_mean.double(), feats.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.bn.running_var.double(), feats.var(1), rtol=1e-5, atol=1e-6)
    assert int(net.bn.num_batches_tracked) == 5
    other = random_net(0).eval()
    other.bn2 = nn.Identity()
    reset_batchnorm(other, [torch.cat(data)[i : i + 10] for i in range(0, 160, 10)])  # other batch size
    assert not other.training
    torch.testing.assert_close(other.bn.running_var, net.bn.running_var, rtol=1e-5, atol=1e-6)
    reset_batchnorm(other, data, max_batches=1)
    torch.testing.assert_close(
        other.bn.running_mean.double(), net.conv(data[0]).double().mean((0, 2, 3)), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="no batches"):
        reset_batchnorm(other, [])


def test_reset_batchnorm_reaches_partial_zip_modules(setup) -> None:
    net, copy_, graph, perms = setup
    model = build_partial([net, copy_], graph, align_to_copy(graph, perms), "relu")
    reset_batchnorm(model, [X])
    for bn in (model.trunk.bn, model.tails[0].bn2, model.tails[1].bn2):
        assert int(bn.num_batches_tracked) == 1
    feats = model.trunk.conv(X).double()
    torch.testing.assert_close(
        model.trunk.bn.running_mean.double(), feats.mean((0, 2, 3)), rtol=1e-5, atol=1e-6
    )


def test_least_squares_recovers_the_ensemble_from_perturbed_weights() -> None:
    """At width N·n the target is reachable exactly: the solve must undo any Linear/Conv perturbation."""
    nets, graph = [random_net(s) for s in range(2)], net_graph()
    tr = concat(graph, 2)
    merged = build_merged_module(nets[0], merge_state_dicts([n.state_dict() for n in nets], graph, tr))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in merged.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                for p in m.parameters():
                    p.add_(0.2 * torch.randn(p.shape, generator=gen))
    ensemble = (nets[0](X) + nets[1](X)) / 2
    assert (merged(X) - ensemble).abs().max() > 0.05
    data = [torch.randn(64, 1, 4, 4, generator=gen) for _ in range(3)]
    least_squares_refit(merged, nets, graph, tr, data, ridge=1e-10)
    torch.testing.assert_close(merged(X), ensemble, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="the data loader is empty"):
        least_squares_refit(merged, nets, graph, tr, [])
    again = least_squares_refit(copy.deepcopy(merged), nets, graph, tr, iter(data), ridge=1e-10)
    torch.testing.assert_close(again(X), merged(X))  # a one-shot iterator is read once, into a list
