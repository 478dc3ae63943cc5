"""``MergeStatistics``: the statistics pass of a merge, as a Lightning callback.

The pass runs in the ``setup`` hook, outside the evaluation loop's inference mode (Fisher and K-FAC
need autograd; the sums are plain tensors the merge reads later), on the strategy's device, with the
calibration loader sharded by whole batches and every state summed once through the strategy
(:mod:`lightning_merge.dataflow`), so a DDP run gives the numbers of one process.

It serves any LightningModule that implements :class:`StatisticsConsumer`: ``statistics_inputs()``
gives the N models, their merge graph and the calibration loader; ``statistics`` receives the result.
``MergeModule`` asks for the statistics itself (:meth:`MergeStatistics.ensure_statistics`) when it
prepares the merge, so nothing depends on which of the two ``setup`` hooks Lightning calls first.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_merge.dataflow import Ranks, check_max_batches, destroy_gloo_group_at_exit
from lightning_merge.graph.spec import MergeGraph
from lightning_merge.stats.collect import collect_statistics
from lightning_merge.stats.container import Statistics
from lightning_merge.stats.moments import moments_memory_bytes
from lightning_merge.stats.registry import known_statistics
from lightning_merge.stats.store import (
    StatisticsFileError,
    StatisticsMismatchError,
    load_statistics,
    model_fingerprint,
    save_statistics,
)


class StatisticsInputs(NamedTuple):
    """What a statistics pass reads: the models, their merge graph and the calibration data."""

    models: Sequence[nn.Module]
    graph: MergeGraph
    calibration: Iterable[Any]


@runtime_checkable
class StatisticsConsumer(Protocol):
    """A LightningModule the callback can serve."""

    statistics: Statistics | None

    def statistics_inputs(self) -> StatisticsInputs: ...


class MergeStatistics(Callback):
    """Run the statistics pass once, before the first validation / test / predict loop.

    Args:
        requires: statistics to gather: registered names (built in: "moments", "grams", "fisher",
            "kfac"; see ``lightning_merge.stats.registry``).
        max_batches: use only the first this-many calibration batches (all when None).
        cache_path: a ``.safetensors`` file: reused when present and gathered for the same models and
            graph, written after a pass otherwise.
        progress: show a progress bar (rank zero only).
    """

    def __init__(
        self,
        requires: Sequence[str] = ("moments",),
        max_batches: int | None = None,
        cache_path: str | None = None,
        progress: bool = True,
    ) -> None:
        if isinstance(requires, str) or not all(isinstance(r, str) for r in requires):
            raise TypeError(f"requires must be a list of statistic names, got {requires!r}")
        known = known_statistics()
        unknown = [r for r in requires if r not in known]
        if unknown or not requires or len(set(requires)) != len(requires):
            raise ValueError(
                f"requires={list(requires)!r}: give each of {known} at most once"
                + (f" (unknown: {unknown})" if unknown else "")
            )
        check_max_batches(max_batches)
        if cache_path is not None and not isinstance(cache_path, (str, os.PathLike)):
            raise TypeError(f"cache_path must be a path or None, got {cache_path!r}")
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be a bool, got {progress!r}")
        self.requires = list(requires)
        self.max_batches = max_batches
        self.cache_path = None if cache_path is None else os.fspath(cache_path)
        self.progress = progress
        self.graph_digest: str | None = None  # of the last statistics provided
        self.source: str | None = None  # "pass" or "cache"

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Gather the statistics (before any loop, so outside inference mode); under CPU DDP (gloo),
        make the process group go before the interpreter does."""
        destroy_gloo_group_at_exit()
        self.ensure_statistics(trainer, pl_module)

    def ensure_statistics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Statistics:
        """Fill ``pl_module.statistics`` (cache or pass) unless it is already set."""
        if not isinstance(pl_module, StatisticsConsumer):
            raise TypeError(
                f"{type(pl_module).__name__} cannot receive merge statistics: give it a `statistics` "
                "attribute and a `statistics_inputs()` method returning StatisticsInputs(models, graph, "
                "calibration loader)"
            )
        if pl_module.statistics is not None:
            return pl_module.statistics
        inputs = _checked(pl_module.statistics_inputs(), pl_module)
        stats = self._from_cache(list(inputs.models), inputs.graph)
        if stats is None:
            stats = self._run_pass(trainer, inputs)
        pl_module.statistics = stats
        self.graph_digest = stats.graph_digest
        return stats

    def _from_cache(self, sources: list[nn.Module], graph: Any) -> Statistics | None:
        if self.cache_path is None or not os.path.exists(self.cache_path):
            return None
        try:
            stats = load_statistics(self.cache_path, graph=graph, models=sources)
        except (StatisticsMismatchError, StatisticsFileError) as err:
            rank_zero_warn(f"not reusing cached statistics: {err}")
            return None
        missing = [r for r in self.requires if r not in stats]
        if missing:
            rank_zero_warn(f"cached statistics in {self.cache_path} lack {missing}; gathering them again")
            return None
        rank_zero_info(f"MergeStatistics: reusing statistics from {self.cache_path}")
        self.source = "cache"
        return stats

    def _run_pass(self, trainer: pl.Trainer, inputs: StatisticsInputs) -> Statistics:
        models, graph = list(inputs.models), inputs.graph
        if "moments" in self.requires:
            mib = moments_memory_bytes(graph, len(models)) / 2**20
            rank_zero_info(f"MergeStatistics: feature moments need {mib:.1f} MiB per rank")
        stats = collect_statistics(
            models,
            graph,
            inputs.calibration,
            requires=self.requires,
            device=trainer.strategy.root_device,
            max_batches=self.max_batches,
            progress=self.progress and trainer.is_global_zero,
            ranks=Ranks.of_strategy(trainer.strategy),
        )
        self.source = "pass"
        if self.cache_path is not None:
            fingerprints = [model_fingerprint(m) for m in models]
            if trainer.is_global_zero:
                save_statistics(stats, self.cache_path, model_fingerprints=fingerprints)
                rank_zero_info(f"MergeStatistics: saved statistics to {self.cache_path}")
            trainer.strategy.barrier("merge_statistics_saved")
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {
            "requires": self.requires,
            "max_batches": self.max_batches,
            "graph_digest": self.graph_digest,
            "source": self.source,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.graph_digest = state_dict.get("graph_digest")
        self.source = state_dict.get("source")


def _checked(inputs: Any, pl_module: pl.LightningModule) -> StatisticsInputs:
    name = type(pl_module).__name__
    if not isinstance(inputs, StatisticsInputs):
        got = type(inputs).__name__
        raise TypeError(f"{name}.statistics_inputs() must return StatisticsInputs, got {got}")
    if not inputs.models or not all(isinstance(m, nn.Module) for m in inputs.models):
        raise ValueError(f"{name}.statistics_inputs() gave no source models (or a non-module among them)")
    if not isinstance(inputs.graph, MergeGraph):
        raise TypeError(f"{name}.statistics_inputs() gave no merge graph, got {type(inputs.graph).__name__}")
    return inputs
