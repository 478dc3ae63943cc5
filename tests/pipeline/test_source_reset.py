"""The sources' BatchNorm reset before the statistics pass (ZipIt!/MuDSC as published) and MuDSC's λ
search as MergeModule runs it (scored on the tasks' training data)."""

from __future__ import annotations

import copy
import itertools

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from trained import quiet_trainer, trained_pair

from lightning_merge.apply.batchnorm_reset import reset_batchnorm
from lightning_merge.data import MergeDataModule, TaskSplitDataModule
from lightning_merge.evaluation import evaluate_model
from lightning_merge.methods import MuDSCMerge, ZipItMerge
from lightning_merge.methods.transform_base import correlation
from lightning_merge.module import MergeModule
from lightning_merge.pipeline.merge import search_score, with_search_score
from lightning_merge.pipeline.prepare import reset_source_batchnorm
from lightning_merge.stats.collect import collect_statistics
from lightning_merge.stats.store import model_fingerprint


def trainer() -> pl.Trainer:
    return quiet_trainer(limit_val_batches=1)


def bn_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running_" in k}


@pytest.fixture(scope="module")
def resnet_pair() -> list:
    return trained_pair("resnet20", width=1)


@pytest.mark.parametrize("reset", [True, False])
def test_statistics_are_gathered_on_the_reset_sources(resnet_pair: list, reset: bool) -> None:
    """reset_sources=True: the statistics equal those of BatchNorm-reset copies of the sources (and
    differ from the untreated sources'); False: those of the untreated sources. Sources untouched."""
    before = [copy.deepcopy(bn_buffers(p.model)) for p in resnet_pair]
    dm = TaskSplitDataModule(calibration_size=96, eval_batch_size=500)
    module = MergeModule(
        sources=resnet_pair, method=ZipItMerge(reset_sources=reset), evaluate_sources=False,
        evaluate_ensemble=False, heatmaps=0,
    )  # fmt: skip
    trainer().validate(module, datamodule=MergeDataModule(dm), verbose=False)
    loader = dm.calibration_dataloader()
    untreated = [copy.deepcopy(p.model).eval() for p in resnet_pair]
    treated = [reset_batchnorm(copy.deepcopy(m), loader).eval() for m in untreated]
    for got, want in zip(module.prepared.models, treated if reset else untreated, strict=True):
        assert all(torch.equal(v, bn_buffers(want)[k]) for k, v in bn_buffers(got).items())
    graph = module.prepared.graph
    space = graph.spaces[0].name
    for models, same in ((treated, reset), (untreated, not reset)):
        ref = collect_statistics(models, graph, loader, progress=False)
        close = torch.allclose(correlation(ref, space), correlation(module.statistics, space), atol=1e-10)
        assert close == same, (reset, same)
    for p, b in zip(resnet_pair, before, strict=True):  # the loaded sources are not modified
        assert all(torch.equal(v, b[k]) for k, v in bn_buffers(p.model).items())
    for got, want in zip(module.sources, untreated, strict=True):  # references: the user's models
        assert all(torch.equal(v, bn_buffers(want)[k]) for k, v in bn_buffers(got).items())


def test_the_untreated_ensemble_is_the_users_models_when_the_sources_are_reset(
    resnet_pair: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With reset_sources the merge reads reset copies, but the untreated references stay untreated:
    the ensemble is scored from the loaded models, the treated one from their reset copies, which are
    the very copies the merge read (one reset per source, not a second identical one)."""
    calls: list[int] = []

    def counted(model: torch.nn.Module, *args: object, **kwargs: object) -> torch.nn.Module:
        calls.append(id(model))
        return reset_batchnorm(model, *args, **kwargs)

    monkeypatch.setattr("lightning_merge.pipeline.prepare.reset_batchnorm", counted)
    monkeypatch.setattr("lightning_merge.pipeline.merge.reset_batchnorm", counted)
    dm = TaskSplitDataModule(calibration_size=96, eval_batch_size=500)
    module = MergeModule(sources=resnet_pair, method=ZipItMerge(reset_sources=True), heatmaps=0)
    trainer().validate(module, datamodule=MergeDataModule(dm), verbose=False)
    assert all(a is b for a, b in zip(module.treated, module.prepared.models, strict=True))
    assert len(calls) == 3  # each source once, the merge once
    loader = dm.calibration_dataloader()
    for got, p in zip(module.treated, resnet_pair, strict=True):  # equal to a fresh copy's reset
        want = reset_batchnorm(copy.deepcopy(p.model), loader)
        assert all(torch.equal(v, bn_buffers(want)[k]) for k, v in bn_buffers(got).items())
    for t, pair in enumerate(resnet_pair):
        batch = next(iter(dm.task_test_dataloader(t)))
        want = pair.model.eval()(batch[0])
        torch.testing.assert_close(module.sources[t](batch[0]), want, rtol=0, atol=0)


def test_reset_copies_get_their_own_fingerprints(resnet_pair: list) -> None:
    """Cached statistics of untreated sources cannot be mistaken for the reset sources'."""
    dm = TaskSplitDataModule(calibration_size=48)
    module = MergeModule(sources=resnet_pair, method=ZipItMerge(reset_sources=False))
    trainer().validate(module, datamodule=MergeDataModule(dm), verbose=False)
    reset = reset_source_batchnorm(module.prepared, dm.calibration_dataloader())
    assert reset.fingerprints == [model_fingerprint(m) for m in reset.models]
    assert all(a != b for a, b in zip(reset.fingerprints, module.prepared.fingerprints, strict=True))


def test_flags_and_search_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="reset_sources must be True or False"):
        ZipItMerge(reset_sources="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reset_sources must be True or False"):
        MuDSCMerge(reset_sources=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="search_criterion"):
        MuDSCMerge(search_criterion="loss")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="search_batches"):
        MuDSCMerge(search_batches=0)
    assert ZipItMerge().reset_sources and MuDSCMerge().reset_sources  # as published


def test_search_needs_the_tasks_training_data() -> None:
    class NoTrain:
        tasks = [[0], [1]]

    with pytest.raises(ValueError, match="NoTrain has no task_train_dataloader"):
        search_score("joint", NoTrain(), None, [], True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="criterion must be 'joint' or 'task_avg'"):
        search_score("loss", NoTrain(), None, [], True)  # type: ignore[arg-type]


def test_lam_search_in_the_module_picks_the_best_training_accuracy() -> None:
    """MergeModule scores every λ by joint accuracy on the first training batches of each task and
    keeps the best; the kept λ's score equals an independent merge at that λ scored the same way."""
    pair = trained_pair("mlp", width=0.25)
    dm = TaskSplitDataModule(calibration_size=256, eval_batch_size=500)
    method = MuDSCMerge(lam_search=True, lam_grid=(0.2, 0.5, 0.8), search_batches=2, max_rounds=3)
    module = MergeModule(sources=pair, method=method, evaluate_sources=False, evaluate_ensemble=False)
    trainer().validate(module, datamodule=MergeDataModule(dm), verbose=False)
    diag = module.result.diagnostics
    assert set(diag["lam_scores"]) == {0.2, 0.5, 0.8} and method.score is None  # the caller's is unchanged
    assert diag["lam_scores"][diag["lam"]] == max(diag["lam_scores"].values())
    single = MuDSCMerge(lam=diag["lam"], max_rounds=3).merge(
        module.prepared.models, graph=module.prepared.graph, stats=module.statistics
    )
    reset_batchnorm(single.model, dm.calibration_dataloader())
    gen = [torch.Generator().manual_seed(0) for _ in range(2)]  # the search's fixed draw of training images
    loaders = [
        list(itertools.islice(DataLoader(dm.dataset_for("train", t), 128, shuffle=True, generator=g), 2))
        for t, g in enumerate(gen)
    ]
    acc = evaluate_model(single.model, loaders, dm.tasks, module.prepared.heads)["joint_acc"]
    assert acc == pytest.approx(diag["lam_scores"][diag["lam"]], abs=1e-9)


def test_an_explicit_score_is_kept() -> None:
    def score(model: torch.nn.Module) -> float:
        return 0.0

    method = MuDSCMerge(lam_search=True, score=score)
    assert with_search_score(method, None, None, [], True) is method  # type: ignore[arg-type]
    assert with_search_score(MuDSCMerge(), None, None, [], True).score is None  # type: ignore[arg-type]
