"""Statistics that describe themselves: a statistic registered from this file (not the package) goes
through the pass, the callback's cache, the store, the export digest and ``check_stats`` with no
edit anywhere else; the built-in collectors keep their sums as torchmetrics states."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
import pytest
import torch
from stats_ddp_script import Sources
from stats_nets import MLP, make_models, mlp_graph
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_sum
from trained import quiet_trainer

from lightning_merge.callbacks.statistics import MergeStatistics
from lightning_merge.methods.base import MergeMethod
from lightning_merge.pipeline.export import statistics_digest
from lightning_merge.stats import (
    STATISTICS,
    StatisticCollector,
    Statistics,
    SumStates,
    collect_statistics,
    known_statistics,
    load_statistics,
    register_statistic,
    save_statistics,
    statistic_collector,
)
from lightning_merge.stats.registry import unregister_statistic
from lightning_merge.stats.store import StatisticsFileError, sidecar_path


class LogitSums(StatisticCollector):
    """Toy statistic ``"logit_sums"``: each model's Σ of its output logits over samples, and the count."""

    name: ClassVar[str] = "logit_sums"

    def attach(self, models: Sequence[nn.Module]) -> None:
        self.sums = SumStates({str(i): (5,) for i in range(len(models))})
        self.count = SumStates({"samples": ()})

    def detach(self) -> None:
        """Nothing hooked."""

    def step(self, models: Sequence[nn.Module], inputs: Tensor) -> None:
        with torch.no_grad():
            for i, model in enumerate(models):
                self.sums.update(str(i), model(inputs).double().sum(0))
        self.count.update("samples", inputs.shape[0])

    def states(self) -> list[Tensor]:
        return self.sums.states() + self.count.states()

    def result(self) -> dict[str, Any]:
        return {"sums": torch.stack(self.sums.states()), "count": float(self.count["samples"])}

    @classmethod
    def to_tensors(cls, value: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"sums": value["sums"]}, {"count": value["count"]}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], meta: Any, num_models: int) -> dict[str, Any]:
        return {"sums": tensors["sums"], "count": meta["count"]}

    @classmethod
    def check(cls, value: Any, num_models: int) -> None:
        if value["sums"].shape != (num_models, 5):
            raise ValueError(
                f"logit_sums: sums of shape {tuple(value['sums'].shape)} for {num_models} models"
            )


@pytest.fixture
def toy() -> Iterator[type[LogitSums]]:
    register_statistic(LogitSums)
    yield LogitSums
    unregister_statistic("logit_sums")


def reference_logit_sums(module: Sources, batches: int) -> Tensor:
    loader = module.calibration_dataloader()
    total = torch.zeros(len(module.sources), 5, dtype=torch.float64)
    with torch.no_grad():
        for b, (x, *_) in enumerate(loader):
            if b == batches:
                break
            for i, model in enumerate(module.sources):
                total[i] += model.eval()(x).double().sum(0)
    return total


def trainer_with(callback: MergeStatistics) -> pl.Trainer:
    return quiet_trainer(callbacks=[callback])


def test_a_statistic_registered_here_flows_through_pass_cache_store_and_digest(toy, tmp_path) -> None:
    assert "logit_sums" in known_statistics()
    path = tmp_path / "stats.safetensors"
    first = Sources()
    callback = MergeStatistics(requires=["moments", "logit_sums"], max_batches=2, cache_path=str(path))
    trainer_with(callback).validate(first, verbose=False)
    stats = first.statistics
    assert callback.source == "pass" and stats.names() == ["moments", "logit_sums"]
    torch.testing.assert_close(
        stats["logit_sums"]["sums"], reference_logit_sums(first, 2), rtol=1e-12, atol=0
    )
    assert stats["logit_sums"]["count"] == 2 * 64

    meta = json.loads(sidecar_path(path).read_text())
    assert meta["statistics"] == ["moments", "logit_sums"]
    assert meta["statistic_meta"]["logit_sums"] == {"count": 128.0}
    assert "logit_sums/sums" in meta["keys"]

    again = Sources()
    callback = MergeStatistics(requires=["logit_sums"], cache_path=str(path), progress=False)
    callback.ensure_statistics(trainer_with(callback), again)
    assert callback.source == "cache"
    assert torch.equal(again.statistics["logit_sums"]["sums"], stats["logit_sums"]["sums"])  # bitwise
    assert statistics_digest(again.statistics) == statistics_digest(stats)

    without = Statistics(stats.num_models, stats.graph_digest, {"moments": stats.moments})
    changed = Statistics(stats.num_models, stats.graph_digest, dict(stats.values))
    changed["logit_sums"] = {"sums": stats["logit_sums"]["sums"] + 1, "count": 128.0}
    digests = {statistics_digest(s) for s in (stats, without, changed)}
    assert len(digests) == 3  # the toy statistic is part of what the merge saw


def test_check_stats_asks_the_registered_collector(toy) -> None:
    class NeedsLogits(MergeMethod):
        name = "needs_logits"
        requires = frozenset({"logit_sums"})

        def merge(self, sources, *, graph, stats, base=None, data=None) -> nn.Module:
            return sources[0]

    method = NeedsLogits()
    stats = Statistics(num_models=2, graph_digest="")
    with pytest.raises(ValueError, match=r"needs statistics \['logit_sums'\] that were not gathered"):
        method.check_stats(stats)
    stats["logit_sums"] = {"sums": torch.zeros(3, 5, dtype=torch.float64), "count": 1.0}
    with pytest.raises(ValueError, match=r"logit_sums: sums of shape \(3, 5\) for 2 models"):
        method.check_stats(stats)
    stats["logit_sums"] = {"sums": torch.zeros(2, 5, dtype=torch.float64), "count": 1.0}
    method.check_stats(stats)


def test_callback_and_pass_refuse_unregistered_statistics(toy, tmp_path) -> None:
    models = make_models(MLP, n=2)
    graph = mlp_graph(models[0])
    loader = DataLoader(torch.randn(12, 8), batch_size=4)
    stats = collect_statistics(models, graph, loader, requires=["moments"], progress=False)
    path = save_statistics(stats, tmp_path / "s.safetensors")
    stats["logit_sums"] = {"sums": torch.zeros(2, 5, dtype=torch.float64), "count": 0.0}
    toy_path = save_statistics(stats, tmp_path / "toy.safetensors")
    unregister_statistic("logit_sums")
    with pytest.raises(ValueError, match=r"unknown: \['logit_sums'\]"):
        MergeStatistics(requires=["logit_sums"])
    with pytest.raises(KeyError, match="unknown statistic 'logit_sums'; registered: .*'moments'"):
        collect_statistics(models, graph, loader, requires=["logit_sums"], progress=False)
    with pytest.raises(StatisticsFileError, match="unknown statistic 'logit_sums'"):
        load_statistics(toy_path)
    with pytest.raises(KeyError, match="unknown statistic 'logit_sums'"):
        save_statistics(stats, tmp_path / "again.safetensors")
    assert list(load_statistics(path).moments) == ["h1", "h2"]


def test_registration_errors_name_the_culprit(toy) -> None:
    class Other(LogitSums):
        pass

    with pytest.raises(ValueError, match="'logit_sums' is already registered by .*LogitSums"):
        register_statistic(Other)
    assert register_statistic(LogitSums) is LogitSums  # registering the same class again is harmless
    with pytest.raises(TypeError, match="not a StatisticCollector subclass"):
        register_statistic(dict)  # type: ignore[type-var]
    Other.name = "a/b"
    with pytest.raises(ValueError, match="without '/', got 'a/b'"):
        register_statistic(Other)
    assert statistic_collector("grams").name == "grams"
    assert sorted(STATISTICS) == known_statistics()


def test_version_1_files_are_refused_with_gather_again(tmp_path) -> None:
    models = make_models(MLP, n=2)
    stats = collect_statistics(models, mlp_graph(models[0]), DataLoader(torch.randn(8, 8), batch_size=4))
    path = save_statistics(stats, tmp_path / "s.safetensors")
    side = sidecar_path(path)
    meta = json.loads(side.read_text())
    side.write_text(json.dumps(meta | {"version": 1}))
    with pytest.raises(StatisticsFileError, match="version 1 .*gather the statistics again"):
        load_statistics(path)


def test_container_is_keyed_by_name_and_empty_means_not_gathered() -> None:
    stats = Statistics(num_models=2, graph_digest="")
    assert "grams" not in stats and stats.grams == [] and stats.names() == []
    stats.gram_counts = [{"fc": 1.0}, {"fc": 1.0}]  # counts alone are not a gathered statistic
    assert "grams" not in stats
    stats.grams = [{"fc": torch.eye(3)}, {"fc": torch.eye(3)}]
    assert "grams" in stats and stats.names() == ["grams"] and stats["grams"].sums is stats.grams
    statistic_collector("grams").check(stats["grams"], 2)
    stats.gram_counts[1] = {"other": 1.0}
    with pytest.raises(ValueError, match=r"model 1: the layers .*\['fc'\].*\['other'\] differ"):
        statistic_collector("grams").check(stats["grams"], 2)
    with pytest.raises(ValueError, match="covers 2 models, the statistics are for 3"):
        statistic_collector("grams").check(stats["grams"], 3)
    with pytest.raises(KeyError, match="'kfac' was not gathered; gathered: \\['grams'\\]"):
        stats["kfac"]
    with pytest.raises(ValueError, match="without '/'"):
        stats["a/b"] = 1


def metrics_of(collector: object) -> list[Metric]:
    found = []
    for value in vars(collector).values():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        found += [m for m in items if isinstance(m, Metric)]
    return found


@pytest.mark.parametrize("name", ["moments", "grams", "fisher", "kfac"])
def test_builtin_states_are_torchmetrics_sum_states(name: str) -> None:
    models = [m.eval() for m in make_models(MLP, n=2)]
    collector = statistic_collector(name).from_graph(mlp_graph(models[0]))
    collector.attach(models)
    collector.step(models, torch.randn(4, 8))
    collector.detach()
    metrics = metrics_of(collector)
    assert metrics
    states = {id(getattr(m, s)) for m in metrics for s in m._defaults}
    assert {id(t) for t in collector.states()} == states  # every state is summed by the pass
    assert all(m._reductions[s] is dim_zero_sum for m in metrics for s in m._defaults)
    assert all(t.dtype == torch.float64 for t in collector.states())


@pytest.mark.parametrize("name", ["moments", "grams", "fisher", "kfac"])
def test_sum_states_keep_no_default_copy_and_reset_to_their_shapes(name: str) -> None:
    """torchmetrics keeps a contiguous copy of every registered default: a (d × d) default doubled
    the memory of the sums. The registered defaults are 0-d; reset() gives zeros at each state's shape."""
    models = [m.eval() for m in make_models(MLP, n=2)]
    collector = statistic_collector(name).from_graph(mlp_graph(models[0]))
    collector.attach(models)
    collector.step(models, torch.randn(4, 8))
    collector.detach()
    for metric in metrics_of(collector):
        assert all(d.numel() == 1 for d in metric._defaults.values())
        shapes = {s: getattr(metric, s).shape for s in metric._defaults}
        assert any(getattr(metric, s).abs().sum() > 0 for s in shapes)
        metric.reset()
        for s, shape in shapes.items():
            state = getattr(metric, s)
            assert state.shape == shape and state.dtype == torch.float64 and not state.any(), s
