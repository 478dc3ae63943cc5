"""Feature moments and the statistics pass against direct numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stats_nets import (
    MLP,
    AttnNet,
    CatNet,
    ConvNet,
    attn_graph,
    cat_graph,
    conv_graph,
    make_models,
    mlp_graph,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge.graph.spec import MergeGraph, Segment, Space, Tap
from lightning_merge.stats.collect import build_collectors, collect_statistics
from lightning_merge.stats.container import FeatureMoments, Statistics
from lightning_merge.stats.moments import FeatureMomentsCollector, moments_memory_bytes


def loader_of(x: torch.Tensor, batch_size: int = 16, labels: bool = False) -> DataLoader:
    data = TensorDataset(x, torch.zeros(len(x))) if labels else x
    return DataLoader(data, batch_size=batch_size)


def tap_inputs(models: list[nn.Module], module: str, x: torch.Tensor, bs: int = 16) -> list[torch.Tensor]:
    """Each model's input to ``module`` over ``x`` in batches of ``bs`` (via a test-side hook)."""
    out = []
    for m in models:
        seen: list[torch.Tensor] = []
        handle = m.get_submodule(module).register_forward_pre_hook(
            lambda _, a, seen=seen: seen.append(a[0].clone())
        )
        mode = m.training
        m.eval()
        with torch.no_grad():
            for batch in x.split(bs):
                m(batch)
        m.train(mode)
        handle.remove()
        out.append(torch.cat(seen))
    return out


def as_rows(feats: list[torch.Tensor], to_rows) -> np.ndarray:
    """Concatenate the models' features column-wise into (samples, N·n) float64."""
    return torch.cat([to_rows(f) for f in feats], dim=1).double().numpy()


def assert_matches(moments: FeatureMoments, rows: np.ndarray) -> None:
    assert moments.count.item() == rows.shape[0]
    np.testing.assert_allclose(moments.total.numpy(), rows.sum(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(moments.outer.numpy(), rows.T @ rows, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(moments.mean.numpy(), rows.mean(0), rtol=1e-9, atol=1e-12)
    ref = np.cov(rows, rowvar=False, bias=True)
    np.testing.assert_allclose(moments.covariance.numpy(), ref, rtol=1e-9, atol=1e-11)


def test_mlp_moments_match_numpy_cov() -> None:
    models = make_models(MLP, n=3)
    graph = mlp_graph(models[0])
    x = torch.randn(50, 8)
    stats = collect_statistics(models, graph, loader_of(x), progress=False)
    assert stats.num_models == 3 and stats.graph_digest == graph.digest()
    assert list(stats.moments) == ["h1", "h2"]
    for space, module in (("h1", "fc2"), ("h2", "fc3")):
        rows = as_rows(tap_inputs(models, module, x), lambda f: f)
        assert stats.moments[space].outer.shape == (rows.shape[1], rows.shape[1])
        assert stats.moments[space].outer.dtype == torch.float64
        assert_matches(stats.moments[space], rows)


def test_conv_taps_count_every_position_and_flattened_inner() -> None:
    models = make_models(ConvNet, n=2)
    graph = conv_graph(models[0])
    x = torch.randn(20, 1, 6, 6)
    for m in models:
        m.train()
    running = models[0].bn1.running_mean.clone()
    stats = collect_statistics(models, graph, loader_of(x, batch_size=7, labels=True), progress=False)
    assert all(m.training for m in models)  # modes restored
    assert torch.equal(models[0].bn1.running_mean, running)  # the pass ran in eval mode
    conv_rows = as_rows(tap_inputs(models, "conv2", x, 7), lambda f: f.permute(0, 2, 3, 1).reshape(-1, 4))
    assert stats.moments["c1"].count.item() == 20 * 6 * 6
    assert_matches(stats.moments["c1"], conv_rows)
    flat_rows = as_rows(
        tap_inputs(models, "fc", x, 7), lambda f: f.view(-1, 6, 36).transpose(1, 2).reshape(-1, 6)
    )
    assert stats.moments["c2"].count.item() == 20 * 36
    assert_matches(stats.moments["c2"], flat_rows)


def test_space_seen_at_two_taps_pools_both() -> None:
    models = make_models(ConvNet, n=2)
    x = torch.randn(9, 1, 6, 6)
    stats = collect_statistics(models, conv_graph(models[0], pool_bn=True), loader_of(x), progress=False)
    to_rows = lambda f: f.permute(0, 2, 3, 1).reshape(-1, 4)  # noqa: E731
    rows = np.concatenate(
        [as_rows(tap_inputs(models, "conv2", x), to_rows), as_rows(tap_inputs(models, "bn1", x), to_rows)]
    )
    assert_matches(stats.moments["c1"], rows)


def test_tap_with_two_segments_feeds_two_spaces() -> None:
    models = make_models(CatNet, n=2)
    x = torch.randn(30, 4)
    stats = collect_statistics(models, cat_graph(models[0]), loader_of(x), progress=False)
    feats = tap_inputs(models, "c", x)
    assert_matches(stats.moments["sa"], as_rows(feats, lambda f: f[:, :5]))
    assert_matches(stats.moments["sb"], as_rows(feats, lambda f: f[:, 5:]))


def test_attention_tap_pools_q_k_v_projections() -> None:
    models = make_models(AttnNet, n=2)
    x = torch.randn(6, 5, 3)  # batch 6, 5 tokens
    stats = collect_statistics(models, attn_graph(models[0]), loader_of(x, batch_size=4), progress=False)
    projections = []
    for m, h in zip(models, tap_inputs(models, "attn", x, 4), strict=True):
        w, b = m.attn.in_proj_weight.detach(), m.attn.in_proj_bias.detach()
        qkv = [
            torch.nn.functional.linear(h, wi, bi).reshape(-1, 8)
            for wi, bi in zip(w.chunk(3), b.chunk(3), strict=True)
        ]
        projections.append(torch.cat(qkv))
    rows = as_rows(projections, lambda f: f)
    assert stats.moments["qkv"].count.item() == 3 * 6 * 5
    assert_matches(stats.moments["qkv"], rows)


def test_correlation_is_finite_for_dead_features() -> None:
    models = make_models(MLP, n=2)
    with torch.no_grad():  # feature 3 of model 1 is always 0 after the ReLU
        models[1].fc1.weight[3] = 0.0
        models[1].fc1.bias[3] = -1.0
    x = torch.randn(40, 8)
    stats = collect_statistics(models, mlp_graph(models[0]), loader_of(x), progress=False)
    corr = stats.moments["h1"].correlation()
    assert torch.isfinite(corr).all()
    dead = 16 + 3
    assert torch.all(corr[dead] == 0) and torch.all(corr[:, dead] == 0)
    rows = as_rows(tap_inputs(models, "fc2", x), lambda f: f)
    live = [j for j in range(32) if rows[:, j].std() > 0]
    np.testing.assert_allclose(
        corr[live][:, live].numpy(), np.corrcoef(rows[:, live], rowvar=False), atol=1e-9
    )


def test_max_batches_and_tuple_batches() -> None:
    models = make_models(MLP, n=2)
    x = torch.randn(100, 8)
    stats = collect_statistics(models, mlp_graph(models[0]), loader_of(x, labels=True), max_batches=2)
    assert stats.moments["h1"].count.item() == 32
    assert_matches(stats.moments["h1"], as_rows(tap_inputs(models, "fc2", x[:32]), lambda f: f))


def test_memory_bytes_is_exactly_the_state_size() -> None:
    models = make_models(ConvNet, n=3)
    graph = conv_graph(models[0])
    collector = FeatureMomentsCollector(graph)
    collector.attach(models)
    collector.detach()
    held = sum(t.untyped_storage().nbytes() for t in collector.states())
    assert moments_memory_bytes(graph, 3) == held == 8 * sum(d * d + d + 1 for d in (12, 18))


class InputSum:
    """A minimal third-party collector: sums the raw inputs (checks the pass drives the protocol)."""

    name = "input_sum"

    def __init__(self) -> None:
        self.total = torch.zeros(8, dtype=torch.float64)
        self.attached = 0

    def attach(self, models):
        self.attached += 1

    def detach(self):
        self.attached -= 1

    def step(self, models, inputs):
        assert self.attached == 1
        self.total += inputs.double().sum(0)

    def states(self):
        return [self.total]

    def fill(self, stats: Statistics) -> None:
        stats.fisher_counts = self.total.tolist()


def test_pass_runs_any_collector_each_on_its_own() -> None:
    models = make_models(MLP, n=2)
    graph = mlp_graph(models[0])
    x = torch.randn(33, 8)
    custom = InputSum()
    stats = collect_statistics(
        models, graph, loader_of(x), collectors=[FeatureMomentsCollector(graph), custom], progress=False
    )
    np.testing.assert_allclose(stats.fisher_counts, x.double().sum(0).numpy(), rtol=1e-12)
    assert custom.attached == 0
    assert stats.moments["h1"].count.item() == 33  # the second collector's pass did not add rows


def test_errors_name_the_culprit() -> None:
    models = make_models(MLP, n=2)
    graph = mlp_graph(models[0])
    x = torch.randn(10, 8)
    with pytest.raises(ValueError, match="no samples"):
        collect_statistics(models, graph, DataLoader(torch.empty(0, 8), batch_size=4), progress=False)
    with pytest.raises(ValueError, match="models is empty"):
        collect_statistics([], graph, loader_of(x))
    with pytest.raises(TypeError, match=r"models\[1\]"):
        collect_statistics([models[0], "nope"], graph, loader_of(x))
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=f"max_batches must be a positive int or None, got {bad}"):
            collect_statistics(models, graph, loader_of(x), max_batches=bad)
    with pytest.raises(KeyError, match="'bogus'"):
        build_collectors(["bogus"], graph)
    with pytest.raises(TypeError, match="dict"):
        collect_statistics(models, graph, [{"x": x}], progress=False)


def test_non_finite_features_name_model_and_merge_point() -> None:
    models = make_models(MLP, n=3)
    graph = mlp_graph(models[0])
    with torch.no_grad():
        models[2].fc2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model 2 at merge point 'h2' \(input of module 'fc3'\)"):
        collect_statistics(models, graph, loader_of(torch.randn(10, 8)), progress=False)
    models = make_models(MLP, n=2)
    x = torch.randn(10, 8)
    x[3, 1] = float("inf")
    with pytest.raises(ValueError, match="model 0 at merge point 'h1'"):
        collect_statistics(models, graph, loader_of(x), progress=False)


def test_model_that_does_not_match_the_graph() -> None:
    models = make_models(MLP, n=2)
    graph = mlp_graph(models[0])
    wrong = nn.Sequential()
    wrong.fc1, wrong.fc2, wrong.fc3 = nn.Linear(8, 10), nn.Linear(10, 12), nn.Linear(12, 3)
    with pytest.raises(ValueError, match=r"model 1 .*'fc1.weight' has shape \(10, 8\)"):
        collect_statistics([models[0], wrong], graph, loader_of(torch.randn(4, 8)))
    graph.param_shapes = {}  # only the runtime width check is left
    with pytest.raises(ValueError, match=r"model 1 .*input of 'fc2' has 10 channels .* needs 16"):
        collect_statistics([models[0], wrong], graph, loader_of(torch.randn(4, 8)), progress=False)
    graph.taps = [*graph.taps, Tap("head", -1, (Segment("h2", 0, 12),))]
    with pytest.raises(ValueError, match="model 0 .*no module 'head'"):
        collect_statistics(models, graph, loader_of(torch.randn(4, 8)))
    graph.taps = [Tap("fc2", -1, (Segment("h1", 0, 15),))]
    with pytest.raises(ValueError, match="merge point 'h1' has offset 0 and size 15"):
        FeatureMomentsCollector(graph)


class InplaceAfterTap(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        y = self.fc2(h)
        h.mul_(2.0)  # changes the tapped input after fc2 read it
        return self.fc3(torch.relu(y)) + h.sum()


def test_in_place_change_of_a_stashed_input_is_detected() -> None:
    models = make_models(InplaceAfterTap, n=2)
    with pytest.raises(RuntimeError, match="model 0 modified the input of 'fc2' in place"):
        collect_statistics(models, mlp_graph(models[0]), loader_of(torch.randn(4, 8)), progress=False)


def test_correlation_and_covariance_of_the_container() -> None:
    rows = np.random.default_rng(0).normal(size=(200, 6)) @ np.diag([1, 2, 3, 0.5, 1, 4])
    rows[:, 4] = 7.0  # a constant (dead) feature
    t = torch.from_numpy(rows)
    m = FeatureMoments(torch.tensor(200.0, dtype=torch.float64), t.sum(0), t.T @ t, num_models=2)
    np.testing.assert_allclose(m.covariance.numpy(), np.cov(rows, rowvar=False, bias=True), atol=1e-10)
    corr = m.correlation()
    live = [0, 1, 2, 3, 5]
    np.testing.assert_allclose(
        corr[live][:, live].numpy(), np.corrcoef(rows[:, live], rowvar=False), atol=1e-9
    )
    assert torch.isfinite(corr).all() and corr[4].abs().max() < 1e-3


def test_float32_batch_products_are_less_exact_than_float64() -> None:
    """The documented trade-off: float64 products match a float64 reference to ~1e-12, float32 ~1e-6."""
    models = make_models(ConvNet, n=2)
    graph = conv_graph(models[0])
    x = torch.randn(64, 1, 6, 6) * 3 + 1
    rows = as_rows(tap_inputs(models, "conv2", x, 32), lambda f: f.permute(0, 2, 3, 1).reshape(-1, 4))
    ref = rows.T @ rows
    errors = {}
    for dtype in (torch.float64, torch.float32):
        collector = FeatureMomentsCollector(graph, batch_dtype=dtype)
        stats = collect_statistics(models, graph, loader_of(x, 32), collectors=[collector], progress=False)
        errors[dtype] = np.abs(stats.moments["c1"].outer.numpy() - ref).max() / np.abs(ref).max()
    assert errors[torch.float64] < 1e-12
    assert 1e-10 < errors[torch.float32] < 1e-5
    with pytest.raises(ValueError, match="batch_dtype"):
        FeatureMomentsCollector(graph, batch_dtype=torch.float16)


def pooled_reference(models: list[nn.Module], graph, x: torch.Tensor, bs: int) -> dict[str, np.ndarray]:
    """Rows of every space straight from the graph's taps, pooled in numpy (an independent reading)."""
    pooled: dict[str, list[np.ndarray]] = {}
    for tap in graph.taps:
        feats = tap_inputs(models, tap.module, x, bs)
        for seg in tap.segments:

            def to_rows(f: torch.Tensor, tap=tap, seg=seg) -> torch.Tensor:
                f = f.movedim(tap.channel_dim, -1)
                f = f.reshape(*f.shape[:-1], -1, tap.inner).transpose(-1, -2)
                return f.reshape(-1, f.shape[-1])[:, seg.offset : seg.offset + seg.size]

            pooled.setdefault(seg.space, []).append(as_rows(feats, to_rows))
    return {k: np.concatenate(v) for k, v in pooled.items()}


def test_traced_resnet_graph_pools_the_residual_stream() -> None:
    from lightning_merge.graph import trace_graph
    from lightning_merge.models import ResNet20

    torch.manual_seed(0)
    models = [ResNet20(width=0.5, blocks_per_stage=2) for _ in range(2)]
    x = torch.randn(12, 1, 12, 12)
    graph = trace_graph(models[0], x[:2])
    stats = collect_statistics(models, graph, loader_of(x, 6), progress=False)
    reference = pooled_reference(models, graph, x, 6)
    assert set(stats.moments) == set(reference)
    residual = max(reference, key=lambda s: len(reference[s]))
    assert len(reference[residual]) > 12 * 144  # observed at several taps, pooled
    for space, rows in reference.items():
        assert_matches(stats.moments[space], rows)


def test_moments_and_grams_in_one_pass_do_not_double_count() -> None:
    models = make_models(MLP, n=2)
    x = torch.randn(37, 8)
    stats = collect_statistics(models, mlp_graph(models[0]), loader_of(x), requires=["moments", "grams"])
    assert stats.moments["h1"].count.item() == 37
    assert [c["fc2"] for c in stats.gram_counts] == [37.0, 37.0]
    h = tap_inputs(models, "fc2", x)[1].double()
    h = torch.cat([h, torch.ones(37, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(stats.grams[1]["fc2"], h.T @ h, rtol=1e-12, atol=1e-12)


class Wide(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(10, width), nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.parametrize(("width", "num_models"), [(61, 2), (301, 2), (40, 3)])
def test_blocked_symmetric_products_match_the_full_product(width: int, num_models: int) -> None:
    """Large spaces multiply only the upper blocks (2 or 4 of them, uneven) and mirror the rest."""
    torch.manual_seed(0)
    models = [Wide(width) for _ in range(num_models)]
    spaces = [Space("h", width)]
    graph = MergeGraph(spaces, [Tap("fc2", -1, (Segment("h", 0, width),))], [], {})
    x = torch.randn(70, 10)
    stats = collect_statistics(models, graph, loader_of(x, 32), progress=False)
    outer = stats.moments["h"].outer
    assert (outer - outer.T).abs().max() <= 1e-13 * outer.abs().max()  # mirrored blocks: symmetric
    assert_matches(stats.moments["h"], as_rows(tap_inputs(models, "fc2", x, 32), lambda f: f))
