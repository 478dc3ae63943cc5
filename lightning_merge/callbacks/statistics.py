"""``MergeStatistics``: gather the merge statistics before validation/test/predict starts.

The pass is explicit (``collect_statistics`` over the module's calibration loader on the
strategy's device), not the validation loop: the loop's ``DistributedSampler`` pads ranks with
repeated samples, while the pass shards without padding and sums each state once across ranks, so
a DDP run gives the same numbers as one process.

The LightningModule provides ``sources`` (the N models), ``merge_graph`` and
``calibration_dataloader()`` (or the datamodule does), and an attribute ``statistics`` that the
callback fills when it is ``None``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_merge.stats.collect import KNOWN_STATISTICS, collect_statistics
from lightning_merge.stats.container import Statistics
from lightning_merge.stats.distributed import destroy_gloo_group_at_exit
from lightning_merge.stats.moments import moments_memory_bytes
from lightning_merge.stats.store import (
    StatisticsFileError,
    StatisticsMismatchError,
    load_statistics,
    model_fingerprint,
    save_statistics,
)


class MergeStatistics(Callback):
    """Run the statistics pass once, before the first validation / test / predict loop.

    Args:
        requires: statistics to gather: any of "moments", "grams", "fisher", "kfac".
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
        unknown = [r for r in requires if r not in KNOWN_STATISTICS]
        if unknown or not requires or len(set(requires)) != len(requires):
            raise ValueError(
                f"requires={list(requires)!r}: give each of {list(KNOWN_STATISTICS)} at most once"
                + (f" (unknown: {unknown})" if unknown else "")
            )
        if max_batches is not None and (not isinstance(max_batches, int) or isinstance(max_batches, bool)):
            raise TypeError(f"max_batches must be an int or None, got {max_batches!r}")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be positive, got {max_batches}")
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
        """Under CPU DDP (gloo), make the process group go before the interpreter does."""
        destroy_gloo_group_at_exit()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ensure_statistics(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ensure_statistics(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.ensure_statistics(trainer, pl_module)

    def ensure_statistics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Statistics:
        """Fill ``pl_module.statistics`` (cache or pass) unless it is already set."""
        current = getattr(pl_module, "statistics", None)
        if current is not None:
            return current
        sources, graph = _sources(pl_module), _graph(pl_module)
        stats = self._from_cache(sources, graph)
        if stats is None:
            stats = self._run_pass(trainer, pl_module, sources, graph)
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
        missing = [r for r in self.requires if not getattr(stats, r)]
        if missing:
            rank_zero_warn(f"cached statistics in {self.cache_path} lack {missing}; gathering them again")
            return None
        rank_zero_info(f"MergeStatistics: reusing statistics from {self.cache_path}")
        self.source = "cache"
        return stats

    def _run_pass(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, sources: list[nn.Module], graph: Any
    ) -> Statistics:
        loader = _calibration_loader(trainer, pl_module)
        if "moments" in self.requires:
            mib = moments_memory_bytes(graph, len(sources)) / 2**20
            rank_zero_info(f"MergeStatistics: feature moments need {mib:.1f} MiB per rank")
        stats = collect_statistics(
            sources,
            graph,
            loader,
            requires=self.requires,
            device=pl_module.device,
            max_batches=self.max_batches,
            progress=self.progress and trainer.is_global_zero,
        )
        self.source = "pass"
        if self.cache_path is not None:
            fingerprints = [model_fingerprint(m) for m in sources]
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


def _sources(pl_module: pl.LightningModule) -> list[nn.Module]:
    sources = getattr(pl_module, "sources", None)
    if not isinstance(sources, (list, tuple, nn.ModuleList)) or not sources:
        raise AttributeError(
            f"{type(pl_module).__name__} must expose `sources`, a non-empty list or nn.ModuleList of "
            f"the source models, for MergeStatistics; got {type(sources).__name__}"
        )
    return list(sources)


def _graph(pl_module: pl.LightningModule) -> Any:
    graph = getattr(pl_module, "merge_graph", None)
    if graph is None:
        raise AttributeError(f"{type(pl_module).__name__} must expose `merge_graph` for MergeStatistics")
    return graph


def _calibration_loader(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    for owner in (pl_module, getattr(trainer, "datamodule", None)):
        make = getattr(owner, "calibration_dataloader", None)
        if callable(make):
            return make()
    raise AttributeError(
        f"MergeStatistics needs calibration data: define calibration_dataloader() on "
        f"{type(pl_module).__name__} or on the trainer's datamodule"
    )
