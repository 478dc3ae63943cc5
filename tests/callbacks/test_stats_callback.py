"""The MergeStatistics callback inside single-process Lightning loops."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from stats_ddp_script import Sources
from torch import nn
from trained import quiet_trainer

from lightning_merge.callbacks.statistics import MergeStatistics
from lightning_merge.stats.collect import collect_statistics


def trainer_with(callback: MergeStatistics) -> pl.Trainer:
    return quiet_trainer(callbacks=[callback])


def test_validate_fills_statistics_equal_to_the_pass() -> None:
    module = Sources()
    callback = MergeStatistics(max_batches=3, progress=False)
    trainer_with(callback).validate(module, verbose=False)
    ref = collect_statistics(
        list(module.sources), module.merge_graph, module.calibration_dataloader(), max_batches=3
    )
    assert module.statistics.moments["c1"].count.item() == 3 * 64 * 36
    assert not module.statistics.moments["c1"].outer.is_inference()  # usable outside the loop
    assert torch.equal(module.statistics.moments["c2"].outer, ref.moments["c2"].outer)
    assert callback.state_dict()["graph_digest"] == module.merge_graph.digest()
    other = MergeStatistics()
    other.load_state_dict(callback.state_dict())
    assert other.graph_digest == callback.graph_digest and other.source == "pass"


def test_cache_is_reused_only_for_the_same_models(tmp_path) -> None:
    path = str(tmp_path / "stats.safetensors")
    first = Sources()
    trainer_with(MergeStatistics(max_batches=2, cache_path=path, progress=False)).test(first, verbose=False)
    again = Sources()
    callback = MergeStatistics(max_batches=2, cache_path=path, progress=False)
    callback.ensure_statistics(trainer_with(callback), again)
    assert callback.source == "cache"
    assert torch.equal(again.statistics.moments["c1"].outer, first.statistics.moments["c1"].outer)
    changed = Sources()
    with torch.no_grad():
        changed.sources[0].conv1.weight.mul_(2)
    callback = MergeStatistics(max_batches=2, cache_path=path, progress=False)
    with pytest.warns(UserWarning, match="other models: model 0"):
        callback.ensure_statistics(trainer_with(callback), changed)
    assert callback.source == "pass"
    assert not torch.equal(changed.statistics.moments["c1"].outer, first.statistics.moments["c1"].outer)


def test_existing_statistics_are_kept_and_the_protocol_is_required() -> None:
    module = Sources()
    sentinel = object()
    module.statistics = sentinel
    callback = MergeStatistics(progress=False)
    assert callback.ensure_statistics(trainer_with(callback), module) is sentinel

    class NoInputs(pl.LightningModule):
        statistics = None

    with pytest.raises(TypeError, match="statistics_inputs"):
        callback.ensure_statistics(trainer_with(callback), NoInputs())


def test_missing_sources_or_graph_are_named() -> None:
    module = Sources()
    module.merge_graph = None
    callback = MergeStatistics(progress=False)
    with pytest.raises(TypeError, match="gave no merge graph"):
        callback.ensure_statistics(trainer_with(callback), module)
    module = Sources()
    module.sources = nn.ModuleList()
    with pytest.raises(ValueError, match="gave no source models"):
        callback.ensure_statistics(trainer_with(callback), module)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"requires": ["moments", "nope"]}, ValueError, "unknown: \\['nope'\\]"),
        ({"requires": []}, ValueError, "requires=\\[\\]"),
        ({"requires": ["moments", "moments"]}, ValueError, "at most once"),
        ({"requires": "moments"}, TypeError, "list of statistic names"),
        ({"max_batches": 0}, ValueError, "max_batches must be a positive int or None, got 0"),
        ({"max_batches": 1.5}, ValueError, "1.5"),
        ({"max_batches": True}, ValueError, "True"),
        ({"cache_path": 3}, TypeError, "cache_path"),
        ({"progress": "yes"}, TypeError, "'yes'"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        MergeStatistics(**kwargs)
