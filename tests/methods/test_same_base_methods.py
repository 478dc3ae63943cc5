"""Task arithmetic, TIES, Fisher, RegMean and MaTS on small models with hand-checkable answers."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

from lightning_merge.methods import (
    ALL_METHODS,
    TIES,
    FisherMerge,
    MaTS,
    RegMean,
    SameBaseMethod,
    TaskArithmetic,
)
from lightning_merge.methods.ties import ties_vector
from lightning_merge.stats.container import Statistics
from lightning_merge.stats.fisher import FisherCollector
from lightning_merge.stats.gram import GramCollector
from lightning_merge.stats.kfac import KFACCollector

SAME_BASE = (TaskArithmetic, TIES, FisherMerge, RegMean, MaTS)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def make_family(n: int = 3) -> tuple[nn.Module, list[nn.Module]]:
    """A float64 base and ``n`` perturbed copies with different BatchNorm statistics."""
    torch.manual_seed(0)
    base = Net().double().eval()
    sources = []
    for i in range(n):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.3 * torch.randn_like(p))
        m.bn.running_mean.fill_(float(i))
        m.bn.num_batches_tracked.fill_(10 + i)
        sources.append(m)
    return base, sources


def data(seed: int = 1, dead_input: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(16, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    if dead_input:
        for x in xs:
            x[:, 2] = 0.0
    return xs


def gather(sources: list[nn.Module], dead_input: bool = False) -> Statistics:
    stats = Statistics(num_models=len(sources), graph_digest="")
    for collector in (GramCollector(), FisherCollector(), KFACCollector()):
        collector.attach(sources)
        for x in data(dead_input=dead_input):
            collector.step(sources, x)
        collector.detach()
        collector.fill(stats)
    return stats


@functools.cache
def _family_stats(n: int, dead_input: bool) -> Statistics:
    return gather(make_family(n)[1], dead_input)


def family_stats(n: int, dead_input: bool = False) -> Statistics:
    """Statistics of ``make_family(n)``'s sources, gathered once per session (a fresh copy each call)."""
    return copy.deepcopy(_family_stats(n, dead_input))


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def layer_matrix(m: nn.Module, name: str) -> torch.Tensor:
    layer = getattr(m, name)
    return torch.cat([layer.weight, layer.bias[:, None]], 1).detach()


# ----------------------------------------------------------------------------- TIES
class Six(nn.Module):
    """Six numbers in two tensors (weight 2×2, bias 2): TIES trims over both together."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor(values[:4]).view(2, 2))
            self.lin.bias.copy_(torch.tensor(values[4:]))


def test_ties_hand_computed_example() -> None:
    base = [1.0] * 6
    taus = [
        [0.5, -0.1, 0.3, -0.8, 0.05, 0.2],
        [-0.6, 0.4, 0.1, 0.7, -0.02, 0.3],
        [0.2, 0.9, -0.4, -0.3, 0.01, 0.0],
    ]
    # k=50%: keep 3 of 6 per vector, over weight and bias together (global, as in the paper):
    #   τ̂1 = [.5, 0, .3, -.8, 0, 0], τ̂2 = [-.6, .4, 0, .7, 0, 0], τ̂3 = [0, .9, -.4, -.3, 0, 0]
    # elected signs of the sums [-.1, 1.3, -.1, -.4, 0, 0] = [-, +, -, -, 0, 0]
    # disjoint means: [-.6, (.4+.9)/2, -.4, (-.8-.3)/2, 0, 0] = [-.6, .65, -.4, -.55, 0, 0]
    expected = torch.tensor([-0.6, 0.65, -0.4, -0.55, 0.0, 0.0])
    sources = [Six([b + t for b, t in zip(base, tau, strict=True)]) for tau in taus]
    for scaling in (1.0, 0.5):
        merged = TIES(k=50, scaling=scaling).merge(sources, graph=None, stats=None, base=Six(base)).model
        got = torch.cat([merged.lin.weight.flatten(), merged.lin.bias]).detach()
        torch.testing.assert_close(got, 1.0 + scaling * expected)
    torch.testing.assert_close(ties_vector(torch.tensor(taus, dtype=torch.float64), 50).float(), expected)


def test_ties_keeps_everything_at_k_100_with_agreeing_signs() -> None:
    tau = torch.tensor([[1.0, -2.0], [3.0, -4.0]], dtype=torch.float64)
    torch.testing.assert_close(ties_vector(tau, 100), torch.tensor([2.0, -3.0], dtype=torch.float64))


# ----------------------------------------------------------------------------- task arithmetic
def test_task_arithmetic_formula_and_buffers() -> None:
    base, sources = make_family(3)
    merged = TaskArithmetic(scaling=0.3).merge(sources, graph=None, stats=None, base=base).model
    for name, p in base.named_parameters():
        expected = p + 0.3 * sum(dict(s.named_parameters())[name] - p for s in sources)
        torch.testing.assert_close(dict(merged.named_parameters())[name], expected)
    torch.testing.assert_close(merged.bn.running_mean, torch.full((6,), 1.0, dtype=torch.float64))
    assert int(merged.bn.num_batches_tracked) == 10  # integer buffers come from source 0


def test_task_arithmetic_without_base_is_the_average() -> None:
    _, sources = make_family(2)
    merged = TaskArithmetic(scaling=5.0).merge(sources, graph=None, stats=None).model
    torch.testing.assert_close(merged.fc1.weight, (sources[0].fc1.weight + sources[1].fc1.weight) / 2)


# ----------------------------------------------------------------------------- Fisher
def test_fisher_merge_of_identical_models_is_exact() -> None:
    _, sources = make_family(1)
    clones = [copy.deepcopy(sources[0]) for _ in range(3)]
    stats = gather(clones)
    stats.fisher[1] = {k: 7 * v + 1 for k, v in stats.fisher[1].items()}  # weights need not agree
    merged = FisherMerge().merge(clones, graph=None, stats=stats).model
    for k, v in sources[0].state_dict().items():
        assert torch.equal(merged.state_dict()[k], v), k


def test_fisher_merge_weights_by_fisher_and_falls_back_to_the_average() -> None:
    _, sources = make_family(2)
    stats = family_stats(2)
    f = [stats.fisher[i]["fc2.weight"] / stats.fisher_counts[i] for i in range(2)]
    f[0][0, 0] = 0.0
    f[1][0, 0] = 0.0  # zero mass: plain average
    for i in range(2):
        stats.fisher[i]["fc2.weight"] = f[i] * stats.fisher_counts[i]
    del stats.fisher[1]["fc1.bias"]  # no Fisher for a parameter: plain average
    merged = FisherMerge(fisher_floor=0.0).merge(sources, graph=None, stats=stats).model
    w = [s.fc2.weight.detach() for s in sources]
    expected = (f[0] * w[0] + f[1] * w[1]) / (f[0] + f[1])
    expected[0, 0] = (w[0][0, 0] + w[1][0, 0]) / 2
    torch.testing.assert_close(merged.fc2.weight, expected)
    torch.testing.assert_close(merged.fc1.bias, (sources[0].fc1.bias + sources[1].fc1.bias) / 2)


# ----------------------------------------------------------------------------- RegMean / MaTS
@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_regmean_solves_its_normal_equations(alpha: float) -> None:
    _, sources = make_family(3)
    stats = family_stats(3)
    merged = RegMean(alpha=alpha).merge(sources, graph=None, stats=stats).model
    for layer in ("fc1", "fc2"):
        w = layer_matrix(merged, layer)
        residual = 0
        for i, s in enumerate(sources):
            g = stats.grams[i][layer] / stats.gram_counts[i][layer]
            g = alpha * g + (1 - alpha) * torch.diag(g.diagonal())
            residual = residual + g @ (w - layer_matrix(s, layer)).T
        assert residual.abs().max() < 1e-10
    # BatchNorm affine parameters (no Gram): the average
    torch.testing.assert_close(merged.bn.weight, sum(s.bn.weight for s in sources) / 3)


def test_regmean_alpha_zero_is_a_per_column_weighted_average() -> None:
    _, sources = make_family(2)
    stats = family_stats(2)
    merged = RegMean(alpha=0.0).merge(sources, graph=None, stats=stats).model
    d = [stats.grams[i]["fc1"].diagonal() / stats.gram_counts[i]["fc1"] for i in range(2)]
    ws = [layer_matrix(s, "fc1") for s in sources]
    torch.testing.assert_close(layer_matrix(merged, "fc1"), (d[0] * ws[0] + d[1] * ws[1]) / (d[0] + d[1]))


def test_regmean_input_never_seen_keeps_the_fallback() -> None:
    base, sources = make_family(2)
    stats = family_stats(2, dead_input=True)
    merged = RegMean(alpha=1.0, scaling=1.0).merge(sources, graph=None, stats=stats, base=base).model
    ta = base.fc1.weight[:, 2] + sum(s.fc1.weight[:, 2] - base.fc1.weight[:, 2] for s in sources)
    torch.testing.assert_close(merged.fc1.weight[:, 2], ta)
    assert torch.isfinite(merged.fc1.weight).all()


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_regmean_closed_form_equals_mats_cg_regmean(alpha: float) -> None:
    _, sources = make_family(3)
    stats = family_stats(3)
    closed = RegMean(alpha=alpha).merge(sources, graph=None, stats=stats).model
    mats = MaTS(subspace="regmean", alpha=alpha, iterations=200, tol=1e-14)
    result = mats.merge(sources, graph=None, stats=stats)
    cg = result.model
    for k, v in closed.state_dict().items():
        if not v.is_floating_point():
            continue
        assert (cg.state_dict()[k] - v).norm() <= 1e-6 * v.norm() + 1e-12, k
    assert set(result.diagnostics["cg"]) == {"fc1", "fc2"}


def test_mats_fisher_solves_the_diagonal_fisher_system() -> None:
    _, sources = make_family(2)
    stats = family_stats(2)
    fisher = FisherMerge(fisher_floor=0.0).merge(sources, graph=None, stats=stats).model
    mats = MaTS(subspace="fisher", iterations=400, tol=1e-14).merge(sources, graph=None, stats=stats).model
    for k, v in fisher.state_dict().items():
        torch.testing.assert_close(mats.state_dict()[k], v, rtol=1e-7, atol=1e-9)


def test_mats_kfac_solves_the_kfac_system() -> None:
    base, sources = make_family(3)
    stats = family_stats(3)
    method = MaTS(subspace="kfac", init="task_arithmetic", scaling=0.5, iterations=300, tol=1e-14)
    result = method.merge(sources, graph=None, stats=stats, base=base)
    merged = result.model
    for layer in ("fc1", "fc2"):
        v = layer_matrix(merged, layer)
        residual = sum(
            (g / stats.kfac_counts[i]) @ (v - layer_matrix(s, layer)) @ (a / stats.kfac_counts[i])
            for i, (s, (a, g)) in enumerate(
                zip(sources, [stats.kfac[j][layer] for j in range(3)], strict=True)
            )
        )
        assert residual.abs().max() < 1e-9, layer
    energy = result.diagnostics["cg"]["fc1"].energy
    assert (energy[1:] <= energy[:-1] + 1e-12).all()
    # parameters outside the subspace keep the init (task arithmetic, λ = 0.5)
    expected = base.bn.bias + 0.5 * sum(s.bn.bias - base.bn.bias for s in sources)
    torch.testing.assert_close(merged.bn.bias, expected)


@pytest.mark.parametrize("subspace", ["regmean", "fisher", "kfac"])
def test_mats_with_zero_iterations_is_its_init(subspace: str) -> None:
    _, sources = make_family(2)
    merged = MaTS(subspace=subspace, iterations=0).merge(sources, graph=None, stats=family_stats(2)).model
    for k, v in merged.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (sources[0].state_dict()[k] + sources[1].state_dict()[k]) / 2)


# ----------------------------------------------------------------------------- every method
@pytest.mark.parametrize("method", SAME_BASE, ids=lambda cls: cls.name)
def test_every_method_merges_n_models_without_touching_them(method: type) -> None:
    base, sources = make_family(3)
    stats = family_stats(3)
    before = [state(s) for s in sources]
    merged = method().merge(sources, graph=None, stats=stats, base=base).model
    assert merged is not sources[0] and isinstance(merged, Net)
    assert merged.state_dict().keys() == sources[0].state_dict().keys()
    for s, b in zip(sources, before, strict=True):
        assert all(torch.equal(s.state_dict()[k], v) for k, v in b.items())
    assert all(torch.isfinite(v).all() for v in merged.state_dict().values())
    assert method in ALL_METHODS and issubclass(method, SameBaseMethod)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("method", SAME_BASE, ids=lambda cls: cls.name)
def test_models_with_different_shapes_are_refused(method: type) -> None:
    base, sources = make_family(3)
    odd = copy.deepcopy(sources[2])
    odd.fc2 = nn.Linear(6, 4).double()
    with pytest.raises(ValueError, match=r"parameter 'fc2.weight' of model 2 has shape \(4, 6\)"):
        method().merge([*sources[:2], odd], graph=None, stats=family_stats(3), base=base)


def test_missing_parameter_and_incompatible_base_are_named() -> None:
    base, sources = make_family(2)
    odd = copy.deepcopy(sources[1])
    del odd.bn
    odd.bn = nn.Identity()
    with pytest.raises(ValueError, match=r"model 1 has no parameter 'bn.weight'"):
        TaskArithmetic().merge([sources[0], odd], graph=None, stats=None, base=base)
    bad_base = Net()
    bad_base.fc1 = nn.Linear(5, 6)
    with pytest.raises(ValueError, match=r"'fc1.weight' of the base model has shape \(6, 5\)"):
        TaskArithmetic().merge(sources, graph=None, stats=None, base=bad_base)
    with pytest.raises(ValueError, match="at least 2 source models"):
        TaskArithmetic().merge(sources[:1], graph=None, stats=None)


@pytest.mark.parametrize(
    ("method", "kwargs", "statistic"),
    [
        (FisherMerge, {}, "fisher"),
        (RegMean, {}, "grams"),
        (MaTS, {"subspace": "regmean"}, "grams"),
        (MaTS, {"subspace": "fisher"}, "fisher"),
        (MaTS, {"subspace": "kfac"}, "kfac"),
    ],
)
def test_a_statistic_not_gathered_is_named(method: type, kwargs: dict, statistic: str) -> None:
    base, sources = make_family(2)
    stats = family_stats(2)
    setattr(stats, statistic, [])
    for given in (stats, None):
        with pytest.raises(ValueError, match=rf"'{statistic}'.*not gathered"):
            method(**kwargs).merge(sources, graph=None, stats=given, base=base)


def test_statistics_of_other_models_are_refused() -> None:
    _, sources = make_family(3)
    stats = family_stats(2)
    with pytest.raises(ValueError, match=r"statistics 'grams' cover 2 models but 3 sources"):
        RegMean().merge(sources, graph=None, stats=stats)
    with pytest.raises(ValueError, match=r"statistics 'fisher' cover 2 models but 3 sources"):
        FisherMerge().merge(sources, graph=None, stats=stats)
    stats = family_stats(3)
    stats.kfac[1]["fc2"] = (torch.eye(5, dtype=torch.float64), stats.kfac[1]["fc2"][1])
    with pytest.raises(ValueError, match=r"'kfac' of model 1 at layer 'fc2' have size 5.*7 input columns"):
        MaTS(subspace="kfac").merge(sources, graph=None, stats=stats)


@pytest.mark.parametrize(
    ("method", "kwargs", "message"),
    [
        (TIES, {"k": 0}, r"k \(percent of each task vector kept\) must be in \(0, 100\], got 0"),
        (TIES, {"k": 100.5}, r"must be in \(0, 100\], got 100.5"),
        (RegMean, {"alpha": 1.5}, r"alpha .* must be in \[0, 1\], got 1.5"),
        (MaTS, {"alpha": -0.1}, r"alpha .* must be in \[0, 1\], got -0.1"),
        (
            MaTS,
            {"subspace": "hessian"},
            r"unknown subspace 'hessian'; valid: \['fisher', 'kfac', 'regmean'\]",
        ),
        (MaTS, {"init": "zeros"}, r"unknown init 'zeros'"),
        (MaTS, {"iterations": -3}, r"iterations must be an int >= 0, got -3"),
        (TaskArithmetic, {"scaling": float("nan")}, r"scaling must be a finite number, got nan"),
        (FisherMerge, {"fisher_floor": -1.0}, r"fisher_floor must be a number >= 0"),
    ],
)
def test_bad_hyperparameters_are_refused(method: type, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        method(**kwargs)


def test_methods_that_need_the_base_say_so() -> None:
    _, sources = make_family(2)
    with pytest.raises(ValueError, match="ties: .* needs the shared base model"):
        TIES().merge(sources, graph=None, stats=None)
    with pytest.raises(ValueError, match="mats: .* needs the shared base model"):
        MaTS(subspace="fisher", init="task_arithmetic").merge(sources, graph=None, stats=family_stats(2))
