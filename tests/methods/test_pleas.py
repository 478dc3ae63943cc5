"""PLeaS as published: block structure, the objective from statistics, and its cost.

* Width 2n: every merged layer is the two sources side by side (M = U = I, zero cross blocks), so
  every Linear/Conv2d output equals the sources' outputs concatenated (to 1e-6).
* The fit from the ``joint_inputs`` statistic equals a direct masked least-squares fit on the
  explicit merged inputs/targets built from the sources' activations (to 1e-6).
* Non-zero weights at width 1.5 are ≤ 1.8× a source's (1.75× per hidden layer by design).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from ddp_launch import run_ddp_script
from pleas_ddp_script import METHOD, PLeaSSources
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Subset

from lightning_merge.graph import trace_graph
from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match.budget import LayerCost, budget_unmatched, relative_flops
from lightning_merge.match.transform import SpaceTransform
from lightning_merge.methods import PLeaSMerge
from lightning_merge.models.resnet import ResNet20
from lightning_merge.stats.collect import collect_statistics
from lightning_merge.stats.container import Statistics
from lightning_merge.stats.store import load_statistics, save_statistics
from tests.stats_nets import MLP, ConvNet

BOTH = ("moments", "joint_inputs")


def layer_io(model: nn.Module, names: Sequence[str], x: torch.Tensor, *, inputs: bool = False) -> dict:
    """Each named module's output (or first input) on ``x``."""
    out: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())

    def hook(name: str):  # noqa: ANN202
        return lambda _m, a, y: out.__setitem__(name, a[0] if inputs else y)

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def random_pair(factory, seeds: tuple[int, int] = (0, 1)) -> list[nn.Module]:  # noqa: ANN001
    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(factory().double().eval())
    return models


def batches(shape: tuple[int, ...], count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(*shape, generator=gen, dtype=torch.float64), torch.zeros(shape[0])) for _ in range(count)
    ]


def solved_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


# ------------------------------------------------------------------ width 2n: the ensemble side by side
def test_width_two_is_the_two_sources_side_by_side() -> None:
    """ResNet-20 (stride-1 convs through shifted windows, stride-2 and 1×1 shortcuts through patches)."""
    models = random_pair(lambda: ResNet20(width=0.25, blocks_per_stage=1))
    data = batches((64, 1, 16, 16), 3)
    graph = trace_graph(models[0], data[0][0][:2])
    stats = collect_statistics(models, graph, data, requires=BOTH, progress=False)
    result = PLeaSMerge(width=2.0, ridge=0.0).merge(models, graph=graph, stats=stats)
    for name, t in result.transforms.items():
        eye = torch.eye(t.merge.shape[1], dtype=torch.float64)
        assert torch.equal(t.merge, eye) and torch.equal(t.unmerge, eye), name
    x = batches((32, 1, 16, 16), 1, seed=5)[0][0]  # held-out inputs
    names = solved_layers(result.model)
    got = layer_io(result.model, names, x)
    per = [layer_io(s, names, x) for s in models]
    for name in names:
        mod = result.model.get_submodule(name)
        if name == "head.proj":  # a fixed output axis: the sources' outputs averaged
            want = (per[0][name] + per[1][name]) / 2
        else:
            want = torch.cat([p[name] for p in per], 1)
            n_out, n_in = mod.weight.shape[0] // 2, mod.weight.shape[1] // 2
            if name != "conv1":  # image channels are a fixed (shared) input axis
                assert not mod.weight[:n_out, n_in:].any() and not mod.weight[n_out:, :n_in].any(), name
        err = float((got[name] - want).norm() / want.norm())
        assert err < 1e-6, f"{name}: relative error {err:.1e}"
    assert result.diagnostics["cost"]["params"] == pytest.approx(2.0)


def test_partial_zip_at_width_two_returns_each_source_output() -> None:
    """The published refit runs on a partial zip's merged trunk too (same layer names)."""
    models = random_pair(lambda: ResNet20(width=0.25, blocks_per_stage=1))
    data = batches((64, 1, 16, 16), 2)
    graph = trace_graph(models[0], data[0][0][:2])
    stats = collect_statistics(models, graph, data, requires=BOTH, progress=False)
    result = PLeaSMerge(width=2.0, ridge=0.0, stop_at=0.5).merge(models, graph=graph, stats=stats)
    assert result.diagnostics["cost"]["params"] == pytest.approx(2.0)
    x = batches((16, 1, 16, 16), 1, seed=3)[0][0]
    with torch.no_grad():
        outs = result.model(x)
        for out, source in zip(outs, models, strict=True):
            want = source(x)
            assert float((out - want).norm() / want.norm()) < 1e-6


# ------------------------------------------------------------------ statistics = direct fit
def _channel_map(t: SpaceTransform | None, n: int, num: int = 2) -> list[torch.Tensor]:
    """Each model's (m, n) map of a feature axis: M_i, or 1/N for a fixed axis."""
    if t is None:
        return [torch.eye(n, dtype=torch.float64) / num for _ in range(num)]
    return [t.merge_block(i) for i in range(num)]


def _owners(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([m.abs().sum(1) > 0 for m in maps])  # (N, m)


def _direct_fit(
    sources: Sequence[nn.Module],
    name: str,
    data: list,
    t_in: SpaceTransform | None,
    t_out: SpaceTransform | None,
    inner: int = 1,
) -> torch.Tensor:
    """Masked least squares on explicit rows: X from M_in · [x_A; x_B] (conv: unfolded), Y from
    M_out · [y_A; y_B]; weight (o, j) only where o's and j's owners intersect. Returns [W | b]."""
    layers = [s.get_submodule(name) for s in sources]
    conv = isinstance(layers[0], nn.Conv2d)
    xs, ys = [], []
    for x, _ in data:
        ins = [layer_io(s, [name], x, inputs=True)[name] for s in sources]
        outs = [layer_io(s, [name], x)[name] for s in sources]
        c_in = ins[0].shape[1] // inner if not conv else ins[0].shape[1]
        mi = _channel_map(t_in, c_in)
        mo = _channel_map(t_out, outs[0].shape[1])
        if conv:
            merged_in = sum(torch.einsum("mc,bchw->bmhw", m, v) for m, v in zip(mi, ins, strict=True))
            rows = F.unfold(merged_in, layers[0].kernel_size, padding=layers[0].padding).transpose(1, 2)
            xs.append(rows.reshape(-1, rows.shape[-1]))
            merged_out = sum(torch.einsum("mc,bchw->bmhw", m, v) for m, v in zip(mo, outs, strict=True))
            ys.append(merged_out.permute(0, 2, 3, 1).reshape(-1, merged_out.shape[1]))
        else:
            views = [v.reshape(v.shape[0], c_in, inner) for v in ins]
            merged_in = sum(torch.einsum("mc,bci->bmi", m, v) for m, v in zip(mi, views, strict=True))
            xs.append(merged_in.reshape(merged_in.shape[0], -1))
            ys.append(sum(v @ m.T for m, v in zip(mo, outs, strict=True)))
    x_rows, y_rows = torch.cat(xs), torch.cat(ys)
    x_rows = torch.cat([x_rows, torch.ones(x_rows.shape[0], 1, dtype=torch.float64)], 1)
    k = layers[0].weight[0, 0].numel() if conv else inner
    own_in = _owners(_channel_map(t_in, c_in)).repeat_interleave(k, dim=1)
    own_out = _owners(_channel_map(t_out, y_rows.shape[1]))
    allowed = (own_out[:, :, None] & own_in[:, None, :]).any(0)
    sol = torch.zeros(y_rows.shape[1], x_rows.shape[1], dtype=torch.float64)
    for o in range(y_rows.shape[1]):
        cols = torch.cat([torch.nonzero(allowed[o]).flatten(), torch.tensor([x_rows.shape[1] - 1])])
        sol[o, cols] = torch.linalg.lstsq(x_rows[:, cols], y_rows[:, o : o + 1]).solution.flatten()
    return sol


def _fitted(layer: nn.Module) -> torch.Tensor:
    return torch.cat(
        [layer.weight.detach().reshape(layer.weight.shape[0], -1), layer.bias.detach()[:, None]], 1
    )


def _space_of(graph: MergeGraph, param: str, axis: int) -> tuple[str | None, int]:
    """The merge point on ``param``'s axis (or None for a fixed axis) and its ``inner`` (flatten)."""
    for space in graph.spaces:
        for ref in space.members:
            if ref.param == param and ref.axis == axis:
                return space.name, ref.inner
    return None, 1


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_fit_from_statistics_equals_a_direct_least_squares_fit(arch: str) -> None:
    """MLP; conv → BN → conv → flatten → Linear (stride-1 shifted windows, a flattened (C, H·W) input)."""
    models, shape = (random_pair(MLP), (300, 8)) if arch == "mlp" else (random_pair(ConvNet), (200, 1, 6, 6))
    data = batches(shape, 3)
    graph = trace_graph(models[0], data[0][0][:2])
    stats: Statistics = collect_statistics(models, graph, data, requires=BOTH, progress=False)
    result = PLeaSMerge(width=1.5, ridge=0.0).merge(models, graph=graph, stats=stats)
    t = result.transforms
    for name in solved_layers(models[0]):
        space_in, inner = _space_of(graph, f"{name}.weight", 1)
        space_out, _ = _space_of(graph, f"{name}.weight", 0)
        assert space_in or space_out, name
        want = _direct_fit(models, name, data, t.get(space_in), t.get(space_out), inner)
        got = _fitted(result.model.get_submodule(name))
        err = float((got - want).norm() / want.norm())
        assert err < 1e-6, f"{arch} {name}: relative difference {err:.1e}"


# ------------------------------------------------------------------ cost
def test_nonzero_weights_at_width_one_and_a_half(mlp_pair: list, fmnist) -> None:
    models = [s.model.eval() for s in mlp_pair]
    calibration = DataLoader(Subset(fmnist.calibration_dataset(), range(500)), batch_size=250)
    graph = trace_graph(models[0], torch.zeros(2, 1, 28, 28))
    stats = collect_statistics(models, graph, calibration, requires=BOTH, progress=False)
    result = PLeaSMerge(width=1.5).merge(models, graph=graph, stats=stats)
    nonzero = sum(int(torch.count_nonzero(p)) for p in result.model.parameters())
    source = sum(p.numel() for p in models[0].parameters())
    assert nonzero <= 1.8 * source, nonzero / source
    layers = result.diagnostics["cost"]["layers"]
    hidden = [n for n in layers if n.startswith("layers") and n != "layers.0"]
    assert hidden and all(layers[n] == pytest.approx(1.75, abs=0.01) for n in hidden), layers
    for name in hidden:  # the structural zeros are really there
        w = result.model.get_submodule(name).weight
        assert int(torch.count_nonzero(w)) <= round(layers[name] * w.numel() / 2.25)
    assert 1.5 < result.diagnostics["cost"]["params"] <= 1.75


# ------------------------------------------------------------------ configuration
def test_objective_decides_requirements_and_data() -> None:
    assert PLeaSMerge().requires == {"moments", "joint_inputs"} and not PLeaSMerge().needs_data
    prop = PLeaSMerge(objective="propagated")
    assert prop.requires == {"moments"} and prop.needs_data
    assert PLeaSMerge(refit=False).requires == {"moments"}
    with pytest.raises(ValueError, match="objective"):
        PLeaSMerge(objective="dense")
    with pytest.raises(ValueError, match="ridge=0"):
        PLeaSMerge(objective="propagated", ridge=0.0)


def test_missing_joint_inputs_is_a_clear_error() -> None:
    models = random_pair(MLP)
    graph = trace_graph(models[0], torch.zeros(2, 8, dtype=torch.float64))
    stats = collect_statistics(models, graph, batches((50, 8), 1), progress=False)
    with pytest.raises(ValueError, match="joint_inputs"):
        PLeaSMerge().merge(models, graph=graph, stats=stats)


def test_statistics_of_other_models_are_refused() -> None:
    models = random_pair(MLP)
    graph = trace_graph(models[0], torch.zeros(2, 8, dtype=torch.float64))
    stats = collect_statistics(models, graph, batches((50, 8), 1), requires=BOTH, progress=False)
    other = copy.deepcopy(stats)
    other.joint_inputs["fc2"] = other.joint_inputs["fc1"]
    with pytest.raises(ValueError, match="'fc2'.*width"):
        PLeaSMerge().merge(models, graph=graph, stats=other)


# ------------------------------------------------------------------ DDP and the statistics store
@pytest.mark.ddp
@pytest.mark.parametrize("rows_above", [None, "400"], ids=["sums", "fc-rows"])
def test_two_ddp_processes_give_the_single_process_weights(tmp_path, rows_above: str | None) -> None:
    """Sums, and the flattened fc kept as rows (stacked across the ranks), against the sums of one process."""
    env = {} if rows_above is None else {"PLEAS_DDP_ROWS_ABOVE": rows_above}
    run = run_ddp_script("pleas_ddp_script.py", tmp_path, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    module = PLeaSSources()  # same seeds → same sources and data
    module.statistics = collect_statistics(
        list(module.sources),
        module.merge_graph,
        module.calibration_dataloader(),
        requires=sorted(METHOD.requires),
        progress=False,
    )
    want = module.merged_state()
    got = load_file(str(tmp_path / "pleas_ddp.safetensors"))
    assert set(got) == set(want)
    for key, w in want.items():
        if w.is_floating_point():
            assert (got[key] - w).abs().max() <= 1e-6 * w.abs().max().clamp_min(1e-12), key


def test_joint_inputs_survive_the_statistics_store(tmp_path) -> None:
    models = random_pair(MLP)
    graph = trace_graph(models[0], torch.zeros(2, 8, dtype=torch.float64))
    stats = collect_statistics(models, graph, batches((50, 8), 2), requires=BOTH, progress=False)
    back = load_statistics(save_statistics(stats, tmp_path / "s.safetensors"), graph=graph)
    assert set(back.joint_inputs) == set(stats.joint_inputs) == {"fc1", "fc2", "fc3"}
    for name, m in stats.joint_inputs.items():
        for field in ("count", "total", "outer"):
            assert torch.equal(getattr(back.joint_inputs[name], field), getattr(m, field)), (name, field)
    assert float(stats.joint_inputs["fc1"].count) == 100


# ------------------------------------------------------------------ budget solver
def _chain(sizes: dict[str, int]) -> list[LayerCost]:
    """input → a → b → c → output, each layer 100 FLOPs per in×out unit."""
    names = list(sizes)
    ends = [None, *names, None]
    return [LayerCost(100.0, i, o) for i, o in itertools.pairwise(ends)]


def test_budget_solver_spans_a_full_merge_to_the_ensemble() -> None:
    sizes = {"a": 16, "b": 32, "c": 8}
    layers = _chain(sizes)
    assert budget_unmatched(layers, sizes, {}, 1.0) == {"a": 0, "b": 0, "c": 0}
    assert budget_unmatched(layers, sizes, {}, 2.0) == sizes
    assert relative_flops(layers, dict.fromkeys(sizes, 1.0)) == pytest.approx(2.0)
    assert relative_flops(layers, dict.fromkeys(sizes, 0.5)) == pytest.approx((1.5 + 1.75 + 1.75 + 1.5) / 4)
    for budget in (1.2, 1.5, 1.8):
        u = budget_unmatched(layers, sizes, {}, budget)
        cost = relative_flops(layers, {k: u[k] / n for k, n in sizes.items()})
        assert budget - 0.05 <= cost <= budget, (budget, u, cost)


def test_budget_solver_opens_the_merge_point_that_loses_most() -> None:
    sizes = {"a": 32, "b": 32, "c": 32}
    layers = [LayerCost(1.0, None, "a"), LayerCost(1.0, None, "b"), LayerCost(1.0, None, "c")]
    u = budget_unmatched(layers, sizes, {"a": 0.1, "b": 0.9, "c": 0.2}, 4 / 3)
    assert u == {"a": 0, "b": 32, "c": 0}
    with pytest.raises(ValueError, match="budget must be in"):
        budget_unmatched(layers, sizes, {}, 2.5)
    with pytest.raises(KeyError, match="'z'"):
        budget_unmatched([LayerCost(1.0, "z", None)], sizes, {}, 1.5)


def test_pleas_under_a_budget_meets_it(mlp_pair: list, fmnist) -> None:
    models = [s.model.eval() for s in mlp_pair]
    calibration = DataLoader(Subset(fmnist.calibration_dataset(), range(500)), batch_size=250)
    graph = trace_graph(models[0], torch.zeros(2, 1, 28, 28))
    stats = collect_statistics(models, graph, calibration, requires=BOTH, progress=False)
    for budget in (1.0, 1.5):
        result = PLeaSMerge(budget=budget).merge(models, graph=graph, stats=stats)
        flops = result.diagnostics["cost"]["flops"]
        assert budget - 0.05 <= flops <= budget + 1e-9, (budget, flops)
    with pytest.raises(ValueError, match="not both"):
        PLeaSMerge(budget=1.5, width=1.5)
