"""``MergeModule``: a merge as a Lightning validation run, assembled from the pipeline's stages.

``trainer.validate(MergeModule(sources=[...], method=ZipItMerge()), datamodule=MergeDataModule(...))``

* ``setup`` (Lightning calls it before any loop, outside inference mode): load and check the sources,
  trace and check the merge graph (:mod:`~lightning_merge.pipeline.prepare`); ask the
  :class:`~lightning_merge.callbacks.statistics.MergeStatistics` callback for the statistics; run the
  method and the post-merge passes (:mod:`~lightning_merge.pipeline.merge`), identical on every rank;
* validation steps (one loader per task) update accuracies of the merge, each source and the ensemble,
  untreated and given the merge's BatchNorm reset, under one scoring rule (:mod:`~.evaluation`);
* ``on_validation_epoch_end``: log ``val/<model>/{joint,taskT}_acc``, report (rank zero), export.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_merge import reporting
from lightning_merge.callbacks.statistics import MergeStatistics, StatisticsInputs
from lightning_merge.cost import Cost
from lightning_merge.data.merge_data import MergeDataModule
from lightning_merge.dataflow import Ranks, batch_inputs
from lightning_merge.evaluation import Scoring, Treat
from lightning_merge.methods.base import MergeMethod
from lightning_merge.methods.config import method_config
from lightning_merge.pipeline import merge as stages
from lightning_merge.pipeline.export import MergeRecord, export_merged
from lightning_merge.pipeline.load import Source, check_source_paths, describe
from lightning_merge.pipeline.merge import ReferenceOptions, Repair
from lightning_merge.pipeline.prepare import PreparedSources, prepare_sources, reset_source_batchnorm
from lightning_merge.stats.container import Statistics


class MergeModule(pl.LightningModule):
    """Merge N sources with ``method`` and evaluate the merge on every task.

    Args:
        sources: checkpoint paths, :class:`~lightning_merge.pipeline.load.SourceSpec` s (any
            LightningModule checkpoint, state-dict / safetensors files with a constructor; YAML: dicts)
            or, from Python, modules (a plain module i is scored on task i).
        method: a :class:`MergeMethod` (YAML: ``class_path`` + ``init_args``).
        base: checkpoint (or module) of the shared pre-trained model, for same-base methods.
        repair: ``True`` / ``"reset"``: reset the merge's BatchNorm statistics on the calibration data;
            ``"rescale"``: REPAIR first (matching methods only), then the reset; ``False``: neither.
        stats_path: statistics file to reuse (when it matches these sources and graph) or write.
        export_dir: write ``model.safetensors`` + ``recipe.yaml`` of the merge there.
        evaluate_sources / evaluate_ensemble: also score each source / the ensemble as references.
        treated_references: ``"ensemble"`` / ``"all"`` (+ sources) / ``"none"``: also score copies given
            the merge's BatchNorm reset (``<name>_reset``; none when ``repair`` is false).
        scoring: ``"logits"`` or ``"per_head_softmax"`` (ZipIt!'s; ``<model>/phs_joint_acc``).
        heatmaps: number of merge points whose correlation matrices are logged as images.
        graph_file: a merge graph JSON file (``lightning_merge.graph.save_graph``) used instead of the
            traced one; the equivalence check judges it all the same.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        method: MergeMethod,
        base: Source | None = None,
        repair: Repair = True,
        stats_path: str | None = None,
        export_dir: str | None = None,
        evaluate_sources: bool = True,
        evaluate_ensemble: bool = True,
        treated_references: Treat = "ensemble",
        scoring: Scoring = "logits",
        heatmaps: int = 3,
        graph_file: str | None = None,
        trusted_checkpoints: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(sources, (str, os.PathLike)) or len(sources) < 2:
            raise ValueError(f"sources must list at least 2 models to merge, got {sources!r}")
        if not isinstance(method, MergeMethod):
            raise TypeError(
                f"method must be a MergeMethod instance (e.g. ZipItMerge()), got {type(method).__name__}"
            )
        if method.needs_base and base is None:
            raise ValueError(f"method {method.name!r} merges task vectors: give base= (the shared model)")
        stages.check_repair(repair, method)
        if heatmaps < 0:
            raise ValueError(f"heatmaps must be >= 0, got {heatmaps}")
        check_source_paths([*sources, *([] if base is None else [base])], has_base=base is not None)
        self.method, self.source_specs, self.base_spec = method, list(sources), base
        self.repair, self.heatmaps, self.graph_file = repair, heatmaps, graph_file
        self.stats_path, self.export_dir = stats_path, export_dir
        self.trusted_checkpoints = trusted_checkpoints
        self.references = ReferenceOptions(evaluate_sources, evaluate_ensemble, treated_references, scoring)
        self.save_hyperparameters(
            {"sources": [describe(s) for s in sources], "method": method_config(method)}
            | {"base": None if base is None else describe(base), "repair": repair, "graph_file": graph_file}
            | {"stats_path": stats_path, "export_dir": export_dir, "heatmaps": heatmaps}
            | {"evaluate_sources": evaluate_sources, "evaluate_ensemble": evaluate_ensemble}
            | {"treated_references": treated_references, "scoring": scoring}
            | {"trusted_checkpoints": trusted_checkpoints}
        )
        self.sources, self.treated = nn.ModuleList(), nn.ModuleList()
        self.prepared: PreparedSources | None = None
        self.statistics: Statistics | None = None
        self.result, self.merged, self.scores = None, None, None  # MergeResult, nn.Module, MergeScores
        self.results: dict[str, float] = {}
        self.costs: dict[str, Cost] = {}

    # ------------------------------------------------------------------ stages
    def setup(self, stage: str) -> None:
        """Prepare the sources, gather the statistics, merge (once; later stages reuse the merge)."""
        if self.merged is not None:
            return
        prepared = self.prepare()
        if self.method.requires:  # configure_callbacks made sure there is a MergeStatistics callback
            callback = next(c for c in self.trainer.callbacks if isinstance(c, MergeStatistics))
            callback.ensure_statistics(self.trainer, self)
        data, ranks = self.data.calibration_dataloader(), Ranks.of_strategy(self.trainer.strategy)
        method = stages.with_search_score(
            self.method, self.data.task_data, prepared, data, self.repair, self.references.scoring, ranks
        )
        self.result = stages.run_method(method, prepared, self.statistics, data, ranks)
        self.merged = stages.post_merge(self.result, prepared, data, self.repair, ranks)
        stages.agree_across_ranks(self.merged, self.trainer.strategy)
        untreated = replace(prepared, models=list(self.sources))  # references start from the user's models
        reset = prepared.models if self.method.reset_sources else None  # the same reset, done once
        scores, treated = self.references.of(
            untreated, self.merged, self.data.tasks, data, self.repair, ranks, already_reset=reset
        )
        self.scores, self.treated = scores.to(self.trainer.strategy.root_device), nn.ModuleList(treated)

    def prepare(self) -> PreparedSources:
        """Load and check the sources, trace and check the graph, on the strategy's device (idempotent)."""
        if self.prepared is None:
            data = self.data
            example = batch_inputs(next(iter(data.calibration_dataloader())))
            prepared = prepare_sources(
                self.source_specs, data.tasks, data.num_classes, example, base=self.base_spec,
                graph_file=self.graph_file, trusted=self.trusted_checkpoints,
            )  # fmt: skip
            device = self.trainer.strategy.root_device
            for m in [*prepared.models, *([prepared.base] if prepared.base is not None else [])]:
                m.to(device)
            self.sources = nn.ModuleList(prepared.models)  # the references: the user's models, untreated
            if self.method.reset_sources:  # before the statistics pass, which reads these models
                ranks = Ranks.of_strategy(self.trainer.strategy)
                prepared = reset_source_batchnorm(prepared, data.calibration_dataloader(), ranks)
            self.prepared = prepared
        return self.prepared

    def statistics_inputs(self) -> StatisticsInputs:
        """What the statistics callback reads (:class:`StatisticsConsumer`)."""
        p = self.prepare()
        return StatisticsInputs(p.models, p.graph, self.data.calibration_dataloader())

    @property
    def data(self) -> MergeDataModule:
        return MergeDataModule.of(self._trainer, "MergeModule")

    def configure_callbacks(self) -> list[pl.Callback]:
        """The statistics pass, unless the trainer already has a ``MergeStatistics`` callback."""
        if not self.method.requires:
            return []
        if self._trainer is not None and any(isinstance(c, MergeStatistics) for c in self.trainer.callbacks):
            return []
        return [MergeStatistics(requires=sorted(self.method.requires), cache_path=self.stats_path)]

    # ------------------------------------------------------------------ evaluation
    def forward(self, x: torch.Tensor) -> Any:
        if self.merged is None:
            raise RuntimeError("the merge has not run yet: call trainer.validate(module, datamodule=...)")
        return self.merged(x)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.scores.score_batch(self.merged, self.sources, self.treated, batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        """Compute (synced across ranks), log, report and export."""
        self.results = self.scores.compute()
        self.scores.reset()
        self.log_dict(
            {f"val/{k}": v for k, v in self.results.items()}, add_dataloader_idx=False, sync_dist=True
        )
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._report()
            if self.export_dir is not None:
                self.export(self.export_dir)

    def _report(self) -> None:
        tasks, graph = len(self.data.tasks), self.prepare().graph
        shape = batch_inputs(next(iter(self.data.calibration_dataloader()))).shape[1:]
        self.costs = reporting.model_costs(self.merged, list(self.sources), shape)
        reporting.print_results(self.results, tasks, costs=self.costs)
        for logger in self.loggers:
            reporting.log_to_logger(logger, self.results, tasks, self.statistics, graph, self.heatmaps)

    def export(self, directory: str | os.PathLike) -> Path:
        """Write the merged model and its recipe (see :mod:`lightning_merge.pipeline.export`)."""
        if self.merged is None or self.prepared is None:
            raise RuntimeError("nothing to export: the merge has not run yet")
        record = MergeRecord(
            self.prepared, self.method, self.merged, self.repair, self.data.tasks,
            base=self.hparams.get("base"), statistics=self.statistics, metrics=self.results,
        )  # fmt: skip
        return export_merged(record, directory)
