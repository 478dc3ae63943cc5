"""MergeModule through the Python API: metrics against independent computations, statistics reuse,
and a clear error for every bad input."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from trained import quiet_trainer, trained_pair

from lightning_merge.callbacks.statistics import MergeStatistics
from lightning_merge.data import MergeDataModule, TaskSplitDataModule
from lightning_merge.evaluation import (
    SourceHead,
    TaskAccuracies,
    ensemble_logits,
    evaluate_model,
    merged_logits,
)
from lightning_merge.methods import ALL_METHODS, TIES, MaTS, MergeMethod, RegMean, ZipItMerge
from lightning_merge.models import SourceClassifier, task_accuracy
from lightning_merge.module import MergeModule


def small_pair() -> list[SourceClassifier]:
    """Two MLP×0.25 sources (task [0..4] seed 0, task [5..9] seed 1), cached on disk."""
    return trained_pair("mlp", width=0.25)


def datamodule() -> TaskSplitDataModule:
    return TaskSplitDataModule(calibration_size=512, eval_batch_size=1000)


trainer = quiet_trainer


@pytest.fixture(scope="module")
def validated() -> tuple[MergeModule, TaskSplitDataModule]:
    dm = datamodule()
    module = MergeModule(sources=small_pair(), method=ZipItMerge(alpha=0.3, beta=0.125))
    trainer().validate(module, datamodule=MergeDataModule(dm), verbose=False)
    return module, dm


# --------------------------------------------------------------------------- evaluation units
def test_source_head_maps_logits_to_global_positions() -> None:
    linear = SourceHead("linear", (5, 7), 10)
    out = linear.to_global(torch.tensor([[1.0, 2.0]]))
    assert out[0, 5] == 1 and out[0, 7] == 2 and torch.isinf(out[0, [0, 6, 9]]).all()
    emb = SourceHead("embedding", (1, 2), 4)
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.equal(emb.to_global(logits), logits)
    own = emb.to_global(logits, own_only=True)
    assert own[0, 1] == 3 and own[0, 2] == 2 and torch.isinf(own[0, [0, 3]]).all()
    with pytest.raises(ValueError, match="gives 2 logits, got 3"):
        linear.to_global(torch.zeros(1, 3))


def test_merged_logits_of_concatenated_heads_and_tuples_equal_the_ensemble() -> None:
    heads = [SourceHead("linear", (0, 1, 2), 6), SourceHead("linear", (3, 4, 5), 6)]
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    expected = torch.cat([a, b], 1)  # disjoint classes in order: the concatenated heads
    assert torch.equal(merged_logits(torch.cat([a, b], 1), heads), expected)
    assert torch.equal(merged_logits((a, b), heads), expected)
    assert torch.equal(ensemble_logits([a, b], heads), expected)
    with pytest.raises(ValueError, match="output has 5 columns"):
        merged_logits(torch.zeros(4, 5), heads)


def test_task_accuracies_match_a_direct_count() -> None:
    torch.manual_seed(0)
    tasks = [[0, 1, 2], [3, 4]]
    metric = TaskAccuracies(tasks, 5, frozenset(range(5)))
    logits, labels = torch.randn(50, 5), torch.randint(0, 3, (50,))
    metric.update(logits, labels, 0)
    logits1, labels1 = torch.randn(30, 5), torch.randint(3, 5, (30,))
    metric.update(logits1, labels1, 1)
    got = metric.compute()
    joint = ((logits.argmax(1) == labels).sum() + (logits1.argmax(1) == labels1).sum()) / 80
    task0 = (logits[:, :3].argmax(1) == labels).float().mean()
    task1 = (logits1[:, 3:].argmax(1) + 3 == labels1).float().mean()
    assert got == pytest.approx(
        {"joint_acc": float(joint), "task0_acc": float(task0), "task1_acc": float(task1)}
    )
    linear_source = TaskAccuracies(tasks, 5, frozenset({0, 1, 2}))
    assert set(linear_source.per_task) == {"0"}  # no prediction is defined on task 1's classes


# --------------------------------------------------------------------------- the merge run
def test_metrics_match_independent_computations(validated: tuple[MergeModule, TaskSplitDataModule]) -> None:
    module, dm = validated
    r = module.results
    expected_keys = {
        f"{m}/{k}"
        for m in ("merged", "source0", "source1", "ensemble", "ensemble_reset")
        for k in ("joint_acc", "task0_acc", "task1_acc")
    }
    assert set(r) == expected_keys
    # MLP sources have no BatchNorm: the merge's treatment leaves the ensemble exactly as it was
    metrics = ("joint_acc", "task0_acc", "task1_acc")
    assert all(r[f"ensemble_reset/{k}"] == r[f"ensemble/{k}"] for k in metrics)
    pair = small_pair()
    for i in range(2):  # each source on its own task: the foundation's own accuracy helper
        assert r[f"source{i}/task{i}_acc"] == pytest.approx(
            task_accuracy(pair[i], dm.task_test_dataloader(i))
        )
        # own-class ensemble: on task i only source i's classes compete
        assert r[f"ensemble/task{i}_acc"] == r[f"source{i}/task{i}_acc"]
    loaders = [dm.task_test_dataloader(t) for t in range(2)]
    again = evaluate_model(module.merged, loaders, dm.tasks, module.prepared.heads)
    assert again == pytest.approx({k.split("/")[1]: v for k, v in r.items() if k.startswith("merged/")})
    print(f"\nMLP×0.25 ensemble joint {r['ensemble/joint_acc']:.3f}, source0 {r['source0/task0_acc']:.3f}")
    assert r["ensemble/joint_acc"] > 0.3 and r["source0/task0_acc"] > 0.7  # real, trained models
    logged = module.trainer.callback_metrics
    assert float(logged["val/merged/joint_acc"]) == pytest.approx(r["merged/joint_acc"])


def test_merge_runs_once_and_leaves_sources_untouched(
    validated: tuple[MergeModule, TaskSplitDataModule],
) -> None:
    module, dm = validated
    before = {k: v.clone() for k, v in module.merged.state_dict().items()}
    merged, results = module.merged, dict(module.results)
    trainer().validate(module, datamodule=MergeDataModule(dm), verbose=False)
    assert module.results == results  # the same test loaders again, not the datamodule's hold-out
    assert module.merged is merged and all(torch.equal(before[k], v) for k, v in merged.state_dict().items())
    for src, ref in zip(module.sources, small_pair(), strict=True):
        assert all(
            torch.equal(a, b)
            for a, b in zip(src.state_dict().values(), ref.model.state_dict().values(), strict=True)
        )


def test_saved_statistics_are_reused(
    tmp_path: Path, validated: tuple[MergeModule, TaskSplitDataModule]
) -> None:
    path = str(tmp_path / "stats.safetensors")
    first = MergeModule(sources=small_pair(), method=ZipItMerge(), stats_path=path, evaluate_sources=False)
    trainer(limit_val_batches=1).validate(first, datamodule=MergeDataModule(datamodule()), verbose=False)
    assert Path(path).is_file()
    second = MergeModule(sources=small_pair(), method=ZipItMerge(), stats_path=path, evaluate_sources=False)
    t = trainer(limit_val_batches=1)
    t.validate(second, datamodule=MergeDataModule(datamodule()), verbose=False)
    callback = next(c for c in t.callbacks if isinstance(c, MergeStatistics))
    assert callback.source == "cache"
    ref = validated[0].merged.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in second.merged.state_dict().items())


def test_method_is_an_instance_and_recorded_by_class_path() -> None:
    module = MergeModule(sources=small_pair(), method=ZipItMerge(alpha=0.5))
    assert module.hparams["method"]["class_path"] == "lightning_merge.methods.zipit.ZipItMerge"
    assert module.hparams["method"]["init_args"]["alpha"] == 0.5
    with pytest.raises(
        TypeError, match=r"method must be a MergeMethod instance \(e.g. ZipItMerge\(\)\), got str"
    ):
        MergeModule(sources=small_pair(), method="zipit")
    with pytest.raises(TypeError, match="method_args"):
        MergeModule(sources=small_pair(), method=ZipItMerge(), method_args={"alpha": 0.5})


# --------------------------------------------------------------------------- errors
def _fake_checkpoint(path: Path, model: SourceClassifier) -> Path:
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": pl.__version__,
        },
        path,
    )
    return path


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match=r"sources\[1\]: checkpoint .*nope.ckpt does not exist"):
        MergeModule(sources=[small_pair()[0], str(missing)], method=ZipItMerge())


def test_different_architecture_names_the_hyperparameter(tmp_path: Path) -> None:
    other = _fake_checkpoint(
        tmp_path / "wide.ckpt", SourceClassifier(arch="mlp", width=0.5, classes=[5, 6, 7, 8, 9])
    )
    module = MergeModule(sources=[small_pair()[0], str(other)], method=ZipItMerge())
    with pytest.raises(ValueError, match=r"wide.ckpt has width=0.5 but .* has width=0.25"):
        trainer().validate(module, datamodule=MergeDataModule(datamodule()), verbose=False)


def test_different_parameter_shapes_are_named() -> None:
    a = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
    b = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    module = MergeModule(sources=[a, b], method=ZipItMerge())
    with pytest.raises(ValueError, match=r"parameter '1.weight' has shape \(32, 784\) in .*Sequential"):
        trainer().validate(module, datamodule=MergeDataModule(datamodule()), verbose=False)


def test_not_a_source_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "weights.ckpt"
    torch.save({"weights": torch.zeros(3)}, path)
    module = MergeModule(sources=[str(path), small_pair()[1]], method=ZipItMerge())
    with pytest.raises(
        ValueError, match=r"sources\[0\]: .*weights.ckpt holds bare weights .*give the model .*constructor"
    ):
        trainer().validate(module, datamodule=MergeDataModule(datamodule()), verbose=False)


def test_data_that_cannot_serve_a_merge_are_named() -> None:
    class NoCalibration(pl.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.inner = datamodule()
            self.tasks, self.num_classes = self.inner.tasks, self.inner.num_classes

        def task_test_dataloader(self, task: int):  # noqa: ANN201
            return self.inner.task_test_dataloader(task)

    with pytest.raises(TypeError, match=r"lacks \['calibration_dataloader'\]"):
        MergeDataModule(NoCalibration())
    module = MergeModule(sources=small_pair(), method=ZipItMerge())
    with pytest.raises(TypeError, match="evaluation and calibration data from a MergeDataModule"):
        trainer().validate(module, datamodule=datamodule(), verbose=False)


def test_missing_base_for_a_task_vector_method() -> None:
    with pytest.raises(ValueError, match="'ties' merges task vectors: give base="):
        MergeModule(sources=small_pair(), method=TIES())


def test_plain_module_sources_take_heads_from_the_tasks() -> None:
    pair = [copy.deepcopy(m.model) for m in small_pair()]
    module = MergeModule(sources=pair, method=ZipItMerge(), evaluate_ensemble=False)
    trainer(limit_val_batches=1).validate(module, datamodule=MergeDataModule(datamodule()), verbose=False)
    assert [h.classes for h in module.prepared.heads] == [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]
    assert module.prepared.heads[0].kind == "embedding" and "merged/task1_acc" in module.results


@pytest.mark.parametrize("cls", ALL_METHODS, ids=lambda cls: cls.name)
def test_every_method_runs_through_the_module(cls: type[MergeMethod]) -> None:
    """Statistics (moments / Gram / Fisher / K-FAC), data-driven and base-needing methods all run."""
    pair = small_pair()
    method = cls(iterations=5) if cls is MaTS else cls()  # MaTS' CG count only sets its cost here
    base = pair[0] if method.needs_base else None
    module = MergeModule(sources=pair, method=method, base=base, evaluate_sources=False)
    dm = TaskSplitDataModule(calibration_size=128, eval_batch_size=500)
    trainer(limit_val_batches=1).validate(module, datamodule=MergeDataModule(dm), verbose=False)
    assert set(module.results) == {
        f"{m}/{k}"
        for m in ("merged", "ensemble", "ensemble_reset")
        for k in ("joint_acc", "task0_acc", "task1_acc")
    }
    print(f"\nMLP×0.25 {cls.name} through the module: joint acc {module.results['merged/joint_acc']:.3f}")
    assert module.results["merged/joint_acc"] > 0.1  # better than chance over 10 classes


# --------------------------------------------------------------------------- REPAIR
def test_repair_rescale_equals_the_direct_calls_and_is_recorded(tmp_path: Path) -> None:
    """repair='rescale': the module's merged weights equal ZipIt! → repair_rescale → BatchNorm reset
    run by hand on the same statistics and calibration batches."""
    from lightning_merge.apply.repair import repair_points, repair_rescale

    dm = datamodule()
    module = MergeModule(
        sources=small_pair(),
        method=ZipItMerge(),
        repair="rescale",
        export_dir=str(tmp_path),
        evaluate_sources=False,
        evaluate_ensemble=False,
    )
    trainer().validate(module, datamodule=MergeDataModule(dm), verbose=False)
    sources = list(module.sources)
    result = ZipItMerge().merge(sources, graph=module.prepared.graph, stats=module.statistics)
    by_hand = result.model
    plain = copy.deepcopy(by_hand)
    assert repair_points(by_hand, module.prepared.graph)  # the MLP's hidden layers
    repair_rescale(
        by_hand,
        sources,
        module.prepared.graph,
        result.transforms,
        dm.calibration_dataloader(),
    )
    for key, want in by_hand.state_dict().items():
        torch.testing.assert_close(module.merged.state_dict()[key], want, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(plain.state_dict()[k], v) for k, v in by_hand.state_dict().items())
    assert "repair: rescale" in (tmp_path / "recipe.yaml").read_text()


def test_bad_repair_settings_are_named() -> None:
    with pytest.raises(ValueError, match="repair must be"):
        MergeModule(sources=small_pair(), method=ZipItMerge(), repair="repair")
    with pytest.raises(ValueError, match="'regmean' has none"):
        MergeModule(sources=small_pair(), method=RegMean(), repair="rescale")


# --------------------------------------------------------------------------- graph override
def test_a_mis_specified_graph_file_is_stopped_by_the_equivalence_check(tmp_path: Path) -> None:
    """A graph whose first merge point forgets its bias (permuting the weight rows alone changes the
    function) never merges: the check on one calibration batch names the changed output."""
    import json

    from lightning_merge.graph import EquivalenceError, save_graph, trace_graph

    pair = small_pair()
    good = trace_graph(pair[0].model, torch.zeros(2, 1, 28, 28))
    save_graph(good, tmp_path / "good.json")
    bad = good.to_dict()
    bad["spaces"][0]["members"] = [m for m in bad["spaces"][0]["members"] if m["param"] != "layers.0.bias"]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    module = MergeModule(sources=pair, method=ZipItMerge(), graph_file=str(tmp_path / "bad.json"))
    with pytest.raises(EquivalenceError, match="permuting the merge points changed output"):
        trainer(limit_val_batches=1).validate(module, datamodule=MergeDataModule(datamodule()), verbose=False)
    assert module.merged is None
    module = MergeModule(sources=pair, method=ZipItMerge(), graph_file=str(tmp_path / "good.json"))
    trainer(limit_val_batches=1).validate(module, datamodule=MergeDataModule(datamodule()), verbose=False)
    assert module.prepared.graph.digest() == good.digest() and module.prepared.equivalence_error < 1e-9
