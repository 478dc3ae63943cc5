"""RegMean / MaTS / Fisher after a one-to-one alignment (``AlignedMerge(aligner=..., merger=...)``) on
real Fashion-MNIST MLP×0.25 sources from different seeds (cached by ``quick_pair``)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from trained import quiet_trainer

from lightning_merge.apply.batchnorm_reset import reset_batchnorm
from lightning_merge.apply.partial import PartialZipModel
from lightning_merge.data import MergeDataModule, TaskSplitDataModule
from lightning_merge.graph import permute_model, random_permutations, trace_graph
from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match.permute import match_identity
from lightning_merge.match.transform import from_assignment
from lightning_merge.methods import (
    TIES,
    AlignedMerge,
    AverageMerge,
    FisherMerge,
    MaTS,
    MergeMethod,
    PermuteMerge,
    RegMean,
    WeightMatchingMerge,
    ZipItMerge,
    build_method,
    method_config,
)
from lightning_merge.methods.aligned import aligned_copies, alignment_permutations
from lightning_merge.module import MergeModule
from lightning_merge.stats.collect import collect_statistics
from lightning_merge.stats.container import Statistics

EXAMPLE = torch.zeros(2, 1, 28, 28)
MATS = {"merger": MaTS(subspace="regmean", iterations=100)}
WM = {"aligner": WeightMatchingMerge()}


class Pair:
    """Two sources, their merge graph and feature moments over the calibration loader."""

    def __init__(self, models: list[nn.Module], calibration: DataLoader) -> None:
        self.models = [m.eval() for m in models]
        self.graph: MergeGraph = trace_graph(self.models[0], EXAMPLE)
        self.stats: Statistics = collect_statistics(self.models, self.graph, calibration, progress=False)
        self.calibration = calibration

    def merge(self, method: MergeMethod) -> nn.Module:
        result = method.merge(self.models, graph=self.graph, stats=self.stats, data=self.calibration)
        return result.model.eval()


@pytest.fixture(scope="module")
def calibration(fmnist) -> DataLoader:
    return DataLoader(Subset(fmnist.calibration_dataset(), range(1000)), batch_size=250)


@pytest.fixture(scope="module")
def test_batches(fmnist) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(DataLoader(Subset(fmnist.dataset_for("test", None), range(2000)), batch_size=500))


@pytest.fixture(scope="module")
def mlp(source_pair: Callable, calibration: DataLoader) -> Pair:
    return Pair([s.model for s in source_pair("mlp", width=0.25)], calibration)


@pytest.fixture(scope="module")
def twin(mlp: Pair, calibration: DataLoader) -> Pair:
    """Model 0 and a randomly permuted copy of it (the same function, other feature order)."""
    model = mlp.models[0]
    copy_ = permute_model(copy.deepcopy(model), mlp.graph, random_permutations(mlp.graph, seed=3))
    return Pair([model, copy_], calibration)


@torch.no_grad()
def joint_accuracy(model: nn.Module, batches: list) -> float:
    correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in batches)
    return correct / sum(len(y) for _, y in batches)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ alignment
@pytest.mark.parametrize("aligner", [PermuteMerge(), WeightMatchingMerge()], ids=["permute", "wm"])
def test_aligned_copies_compute_the_same_function(
    aligner: MergeMethod, mlp: Pair, test_batches: list
) -> None:
    transforms = AlignedMerge(aligner=aligner).match(mlp.models, mlp.graph, mlp.stats)
    aligned = aligned_copies(mlp.models, mlp.graph, transforms)
    x = test_batches[0][0]
    with torch.no_grad():
        for i, (a, s) in enumerate(zip(aligned, mlp.models, strict=True)):
            assert a is not s
            assert relative_error(a(x), s(x)) < 1e-5, f"model {i}"
    # model 1 really moved; model 0 (the reference order) did not; the sources are untouched
    w = [m.state_dict()["layers.0.weight"] for m in (*mlp.models, *aligned)]
    assert torch.equal(w[2], w[0]) and not torch.equal(w[3], w[1])


def test_weight_matching_aligns_a_permuted_copy_back_to_model_0(twin: Pair) -> None:
    transforms = AlignedMerge(**WM).match(twin.models, twin.graph, None)
    aligned = aligned_copies(twin.models, twin.graph, transforms)
    want = twin.models[0].state_dict()
    assert not torch.equal(twin.models[1].state_dict()["layers.0.weight"], want["layers.0.weight"])
    for key, value in aligned[1].state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=0, msg=key)


def test_permute_alignment_inverts_the_permutation_on_live_features(twin: Pair) -> None:
    """perm[got[k]] = k for every feature that varies on the data; features dead on every
    calibration image (ReLU never active, zero variance) have no correlation to match them by."""
    perms = random_permutations(twin.graph, seed=3)  # what built the twin
    transforms = AlignedMerge().match(twin.models, twin.graph, twin.stats)
    got = alignment_permutations(transforms, twin.graph, 2)
    dead = total = 0
    for space in twin.graph.spaces:
        n = space.size
        live = twin.stats.moments[space.name].covariance.diagonal()[:n] > 1e-12
        dead += int((~live).sum())
        total += n
        assert torch.equal(got[0][space.name], torch.arange(n))
        recovered = perms[space.name][got[1][space.name]] == torch.arange(n)
        assert bool(recovered[live].all()), space.name
    # the check above covers almost every feature: 6 / 6 / 10 of 384 dead at LIGHTNING_MERGE_TEST_SEED
    # 0 / 100 / 200, so a fixed count (< 10 before) was a coin toss across draws
    print(f"\nMLP×0.25 model 0: {dead} of {total} features dead on the calibration images")
    assert dead <= 0.05 * total, (dead, total)


def test_a_many_to_one_matching_is_rejected(mlp: Pair) -> None:
    space = mlp.graph.spaces[0]
    n = space.size
    transforms = {s.name: match_identity(s.size, 2) for s in mlp.graph.spaces}
    fused = torch.cat([torch.arange(n), torch.tensor([0, 0]), torch.arange(2, n)])  # model 1: 0, 1 → 0
    transforms[space.name] = from_assignment(fused, n, 2)
    with pytest.raises(ValueError, match=f"merge point {space.name!r}: the unmerge block of model 1 is not"):
        alignment_permutations(transforms, mlp.graph, 2)
    transforms[space.name] = from_assignment(torch.arange(2 * n), 2 * n, 2)  # side by side (width 2n)
    with pytest.raises(ValueError, match=f"merge point {space.name!r}: transform of width {2 * n}"):
        alignment_permutations(transforms, mlp.graph, 2)
    del transforms[space.name]
    with pytest.raises(KeyError, match="no transform for merge point"):
        alignment_permutations(transforms, mlp.graph, 2)


# ------------------------------------------------------------------ merging
@pytest.mark.parametrize(
    "kwargs",
    [{}, MATS, WM, {"merger": FisherMerge(), "max_batches": 1}],
    ids=["regmean", "mats", "wm", "fisher"],
)
def test_merging_a_permuted_copy_recovers_model_0(kwargs: dict, twin: Pair, test_batches: list) -> None:
    merged = twin.merge(AlignedMerge(**kwargs))
    x = test_batches[0][0]
    with torch.no_grad():
        assert relative_error(merged(x), twin.models[0](x)) < 1e-5


def test_aligned_regmean_beats_averaging(mlp: Pair, test_batches: list, calibration: DataLoader) -> None:
    scores = {
        name: joint_accuracy(reset_batchnorm(mlp.merge(method), calibration).eval(), test_batches)
        for name, method in [
            ("average", AverageMerge()),
            ("aligned regmean", AlignedMerge()),
            ("aligned mats", AlignedMerge(**MATS)),
            ("aligned(wm) regmean", AlignedMerge(**WM)),
        ]
    }
    sources = [joint_accuracy(m, test_batches) for m in mlp.models]
    print("\nMLP×0.25 joint acc: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    print("MLP×0.25 sources' joint acc: " + ", ".join(f"{s:.3f}" for s in sources))
    assert scores["aligned regmean"] > scores["average"] + 0.05
    assert scores["aligned mats"] > scores["average"] + 0.05
    assert scores["aligned(wm) regmean"] > scores["average"]
    # a merge of two 5-class experts: above each expert's 50 % ceiling is implausible at this size
    assert all(0.2 < v < 0.9 for v in scores.values())
    assert all(0.4 < s < 0.55 for s in sources)


def test_statistics_pass_honours_max_batches(mlp: Pair) -> None:
    """max_batches=1 over the loader = the whole pass over its first batch alone."""
    first = [next(iter(mlp.calibration))]
    limited = mlp.merge(AlignedMerge(max_batches=1)).state_dict()
    one = AlignedMerge().merge(mlp.models, graph=mlp.graph, stats=mlp.stats, data=first).model
    full = mlp.merge(AlignedMerge()).state_dict()
    for key, value in one.state_dict().items():
        torch.testing.assert_close(limited[key], value, rtol=0, atol=0, msg=key)
    assert not torch.allclose(limited["layers.2.weight"], full["layers.2.weight"])


def test_partial_merge_keeps_every_source_tail(mlp: Pair, test_batches: list) -> None:
    partial = mlp.merge(AlignedMerge(stop_at=0.5))
    assert isinstance(partial, PartialZipModel)
    x = test_batches[0][0][:64]
    with torch.no_grad():
        outs = partial(x)
    assert len(outs) == 2 and all(o.shape == (64, 10) for o in outs)
    # the trunk carries RegMean's weights of the aligned copies, not the permute average
    full = mlp.merge(AlignedMerge()).state_dict()
    trunk = partial.trunk.state_dict()
    assert trunk and all(torch.equal(v, full[k]) for k, v in trunk.items())
    # (layer 0 sees the same pixels in both models: there RegMean is the average, exactly)
    average = mlp.merge(PermuteMerge()).state_dict()
    assert "layers.2.weight" in trunk and "layers.4.weight" not in trunk
    assert not torch.allclose(trunk["layers.2.weight"], average["layers.2.weight"])


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"aligner": "permute"}, TypeError, "aligner must be a matching method .* got str"),
        ({"aligner": RegMean()}, TypeError, "aligner must be a matching method .* got RegMean"),
        (
            {"aligner": PermuteMerge(stop_at=0.5)},
            ValueError,
            "sets stop_at=0.5; give stop_at to AlignedMerge",
        ),
        ({"merger": "regmean"}, TypeError, "merger must be a same-base method .* got str"),
        ({"merger": ZipItMerge()}, TypeError, "merger must be a same-base method .* got ZipItMerge"),
        ({"merger": TIES()}, ValueError, "merger TIES.* needs a shared base model"),
        ({"merger": MaTS(init="task_arithmetic")}, ValueError, "aligned models have none .*init='average'"),
        ({"max_batches": 0}, ValueError, "max_batches must be a positive int"),
        ({"stop_at": 2.0}, ValueError, "stop_at must be"),
    ],
)
def test_bad_arguments_are_rejected_at_construction(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        AlignedMerge(**kwargs)


def test_merge_time_errors_name_the_culprit(mlp: Pair) -> None:
    method = AlignedMerge()
    with pytest.raises(ValueError, match="'aligned' needs a data loader"):
        method.merge(mlp.models, graph=mlp.graph, stats=mlp.stats)
    with pytest.raises(ValueError, match=r"'aligned' needs statistics \['moments'\]"):
        method.merge(mlp.models, graph=mlp.graph, stats=None, data=mlp.calibration)
    with pytest.raises(ValueError, match="needs the sources' merge graph"):
        method.merge(mlp.models, graph=None, stats=mlp.stats, data=mlp.calibration)
    with pytest.raises(ValueError, match="yielded no samples"):
        method.merge(mlp.models, graph=mlp.graph, stats=mlp.stats, data=[])


def test_weight_matching_alignment_needs_no_statistics(mlp: Pair, test_batches: list) -> None:
    method = AlignedMerge(aligner=WeightMatchingMerge(max_iter=5))
    assert method.requires == frozenset() and method.aligner.max_iter == 5
    merged = method.merge(mlp.models, graph=mlp.graph, stats=None, data=mlp.calibration).model
    assert merged(test_batches[0][0][:4]).shape == (4, 10)


def test_result_carries_the_alignment_and_the_mergers_diagnostics(mlp: Pair) -> None:
    """transforms = the aligner's one-to-one matching; diagnostics["merger"] = MaTS' CG histories;
    the method object is left as it was and merges again to the same weights."""
    method = AlignedMerge(merger=MaTS(subspace="regmean", iterations=7))
    before = method_config(method)
    result = method.merge(mlp.models, graph=mlp.graph, stats=mlp.stats, data=mlp.calibration)
    assert set(result.transforms) == {s.name for s in mlp.graph.spaces}
    want = PermuteMerge().match(mlp.models, mlp.graph, mlp.stats)
    assert all(torch.equal(result.transforms[k].merge, t.merge) for k, t in want.items())
    cg = result.diagnostics["merger"]["cg"]
    assert set(cg) == {"layers.0", "layers.2", "layers.4", "head.proj"}
    assert all(r.iterations <= 7 for r in cg.values())
    again = method.merge(mlp.models, graph=mlp.graph, stats=mlp.stats, data=mlp.calibration).model
    assert method_config(method) == before
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in result.model.state_dict().items())


# ------------------------------------------------------------------ Lightning
def test_runs_through_merge_module(source_pair: Callable) -> None:
    method = AlignedMerge(merger=MaTS(subspace="regmean", iterations=10))
    module = MergeModule(sources=source_pair("mlp", width=0.25), method=method, evaluate_sources=False)
    dm = TaskSplitDataModule(calibration_size=512, eval_batch_size=1000)
    quiet_trainer(limit_val_batches=1).validate(module, datamodule=MergeDataModule(dm), verbose=False)
    assert set(module.results) == {
        f"{m}/{k}"
        for m in ("merged", "ensemble", "ensemble_reset")
        for k in ("joint_acc", "task0_acc", "task1_acc")
    }
    print(f"\naligned MaTS through the module: joint acc {module.results['merged/joint_acc']:.3f}")
    assert module.results["merged/joint_acc"] > 0.3
    assert module.statistics is not None and module.statistics.moments  # the alignment's pass
    assert module.result is not None
    assert set(module.result.diagnostics["merger"]["cg"]) == {
        "layers.0",
        "layers.2",
        "layers.4",
        "head.proj",
    }


def test_recipe_nests_the_aligner_and_merger_and_builds_them_back() -> None:
    """The exported recipe carries the nested methods as {class_path, init_args}, so the merge can be
    rebuilt from it."""
    method = AlignedMerge(
        aligner=WeightMatchingMerge(max_iter=5), merger=MaTS(subspace="regmean", iterations=7)
    )
    config = method_config(method)
    args = config["init_args"]
    assert args["merger"] == {
        "class_path": "lightning_merge.methods.mats.MaTS",
        "init_args": {
            "subspace": "regmean",
            "init": "average",
            "scaling": 1.0,
            "iterations": 7,
            "alpha": 1.0,
            "tol": 0.0,
        },
    }
    assert args["aligner"]["class_path"] == "lightning_merge.methods.weight_matching.WeightMatchingMerge"
    rebuilt = build_method(config)
    assert isinstance(rebuilt, AlignedMerge) and isinstance(rebuilt.merger, MaTS)
    assert rebuilt.merger.iterations == 7 and rebuilt.aligner.max_iter == 5
    assert method_config(rebuilt) == config
