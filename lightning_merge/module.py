"""``MergeModule``: merging as a Lightning validation run.

``trainer.validate(MergeModule(sources=[...], method=ZipIt()), datamodule=TaskSplitDataModule(...))``

1. ``setup``: load the N sources (checkpoint paths or modules), check they share one architecture,
   trace the merge graph from one calibration batch;
2. ``on_validation_start``: the :class:`~lightning_merge.callbacks.statistics.MergeStatistics`
   callback (added by :meth:`configure_callbacks` unless the trainer has one) fills
   ``self.statistics`` over the calibration loader, exactly across ranks; then the merge runs once,
   identically on every rank (checked, and rank 0's weights broadcast if a rank disagrees), and the
   BatchNorm statistics of the merged model are reset over the calibration data;
3. validation steps over every task's *test* loader (unpadded sharding, so 2 ranks count every image
   once) update torchmetrics accuracies of the merged model, each source and the ensemble;
4. ``on_validation_epoch_end``: log ``val/<model>/{joint,taskT}_acc``, print the results table,
   send the W&B table / charts (rank zero) and export the merged model when ``export_dir`` is set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch import nn
from torch.utils.data import DataLoader

from lightning_merge.apply.partial import PartialZipModel
from lightning_merge.apply.repair import reset_batchnorm
from lightning_merge.apply.rescale import repair_rescale
from lightning_merge.evaluation import SourceHead, TaskAccuracies, ensemble_logits, merged_logits
from lightning_merge.methods.base import MergeMethod, MergeResult
from lightning_merge.methods.config import method_config
from lightning_merge.methods.transform_base import TransformMethod
from lightning_merge.models.classifier import SourceClassifier
from lightning_merge.sources import architecture_of, check_same_architecture, load_checkpoint
from lightning_merge.stats.store import model_fingerprint

log = logging.getLogger(__name__)

Source = str | os.PathLike | nn.Module


class MergeModule(pl.LightningModule):
    """Merge N source classifiers with ``method`` and evaluate the merge on every task.

    Args:
        sources: ``SourceClassifier`` checkpoint paths (or, from Python, ``SourceClassifier`` /
            plain ``nn.Module`` sources; a plain module i is scored on the datamodule's task i).
        method: a :class:`MergeMethod` instance, e.g. ``ZipItMerge(alpha=0.3)`` (YAML: ``class_path``
            + ``init_args``, nested the same way for ``AlignedMerge``'s ``aligner`` / ``merger``).
        base: checkpoint (or module) of the shared pre-trained model for same-base methods.
        repair: after the merge, over the calibration data: ``True`` / ``"reset"`` recomputes the
            merged model's BatchNorm statistics; ``"rescale"`` first applies REPAIR (rescales every
            un-normalised merged layer to its sources' merged statistics; matching methods only),
            then the reset; ``False`` does neither.
        stats_path: statistics file to reuse (when it matches these sources and graph) or write.
        export_dir: write ``model.safetensors`` + ``recipe.yaml`` of the merge there.
        evaluate_sources / evaluate_ensemble: also score each source / the ensemble as references.
        heatmaps: number of merge points whose correlation matrices are logged as images.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        method: MergeMethod,
        base: Source | None = None,
        repair: bool | Literal["reset", "rescale"] = True,
        stats_path: str | None = None,
        export_dir: str | None = None,
        evaluate_sources: bool = True,
        evaluate_ensemble: bool = True,
        heatmaps: int = 3,
    ) -> None:
        super().__init__()
        if isinstance(sources, (str, os.PathLike)) or len(sources) < 2:
            raise ValueError(f"sources must list at least 2 models to merge, got {sources!r}")
        if not isinstance(method, MergeMethod):
            raise TypeError(
                f"method must be a MergeMethod instance (e.g. ZipItMerge()), got {type(method).__name__}"
            )
        if method.needs_base and base is None:
            raise ValueError(
                f"method {method.name!r} merges task vectors: give base= (the shared pre-trained model)"
            )
        if repair not in (True, False, "reset", "rescale"):
            raise ValueError(f"repair must be True, False, 'reset' or 'rescale', got {repair!r}")
        if repair == "rescale" and not isinstance(method, TransformMethod):
            raise ValueError(
                f"repair='rescale' needs a matching method's transforms; method {method.name!r} has none "
                "(use repair='reset')"
            )
        if heatmaps < 0:
            raise ValueError(f"heatmaps must be >= 0, got {heatmaps}")
        for i, spec in enumerate([*sources, *([] if base is None else [base])]):
            label = f"sources[{i}]" if i < len(sources) else "base"
            if isinstance(spec, (str, os.PathLike)) and not Path(spec).is_file():
                raise FileNotFoundError(f"{label}: checkpoint {os.fspath(spec)} does not exist")
        self.method = method
        self.source_specs = list(sources)
        self.base_spec = base
        self.repair, self.heatmaps = repair, heatmaps
        self.stats_path, self.export_dir = stats_path, export_dir
        self.evaluate_sources, self.evaluate_ensemble = evaluate_sources, evaluate_ensemble
        # the recipe as loggers record it: paths and the method's class path + arguments, not objects
        self.save_hyperparameters(
            {
                "sources": [_describe(s) for s in sources],
                "method": method_config(method),
                "base": None if base is None else _describe(base),
                "repair": repair,
                "stats_path": stats_path,
                "export_dir": export_dir,
                "evaluate_sources": evaluate_sources,
                "evaluate_ensemble": evaluate_ensemble,
                "heatmaps": heatmaps,
            }
        )
        self.sources = nn.ModuleList()
        self.base_model: nn.Module | None = None
        self.merged: nn.Module | None = None
        self.merge_result: MergeResult | None = None  # the method's output (transforms, diagnostics)
        self.merge_graph: Any = None
        self.statistics: Any = None
        self.heads: list[SourceHead] = []
        self.architecture: dict[str, Any] | None = None
        self.fingerprints: list[str] = []
        self.tasks: list[list[int]] = []
        self.metrics = nn.ModuleDict()
        self.results: dict[str, float] = {}

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        """Load the sources, check them, trace the graph (once; later stages reuse it)."""
        dm = self._datamodule()
        self._route_validation_to_module()
        if self.merge_graph is not None:
            return
        self.tasks = [list(t) for t in dm.tasks]
        loaded = [load_checkpoint(s, f"sources[{i}]") for i, s in enumerate(self.source_specs)]
        check_same_architecture(loaded, [_describe(s) for s in self.source_specs])
        self.architecture = architecture_of(loaded[0])
        models = [m.model if isinstance(m, SourceClassifier) else m for m in loaded]
        for m in models:
            m.eval().requires_grad_(False)
        self.sources = nn.ModuleList(models)
        if self.base_spec is not None:
            base = load_checkpoint(self.base_spec, "base")
            check_same_architecture([loaded[0], base], ["sources[0]", _describe(self.base_spec)])
            self.base_model = (base.model if isinstance(base, SourceClassifier) else base).eval()
        self.fingerprints = [model_fingerprint(m) for m in models]
        example = self._example_inputs()
        self.heads = [self._head_of(i, m, example) for i, m in enumerate(loaded)]
        self.merge_graph = _trace(models[0], example[:2])
        self._build_metrics(dm.num_classes)

    def _datamodule(self) -> Any:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "tasks") or not hasattr(dm, "task_test_dataloader"):
            raise ValueError(
                "MergeModule evaluates on every task's test loader: pass a datamodule with `tasks` and "
                "`task_test_dataloader(i)` (e.g. lightning_merge.data.TaskSplitDataModule) "
                "to trainer.validate"
            )
        return dm

    def _route_validation_to_module(self) -> None:
        """Make ``trainer.validate(module, datamodule=dm)`` use :meth:`val_dataloader` of this module.

        Lightning asks the datamodule for loaders when one is given; a merge is judged on every task's
        *test* set, which the datamodule's own ``val_dataloader`` (a hold-out) is not.
        """
        loop = self.trainer.validate_loop
        source = getattr(loop, "_data_source", None)
        if source is None or not hasattr(source, "instance"):
            raise RuntimeError(
                "this Lightning version has no validate_loop._data_source; MergeModule needs it"
            )
        source.instance = self

    def _head_of(self, i: int, model: nn.Module, example: torch.Tensor) -> SourceHead:
        num_classes = self.trainer.datamodule.num_classes
        if isinstance(model, SourceClassifier):
            return SourceHead(model.head_kind, tuple(model.classes), model.num_classes)
        if i >= len(self.tasks):
            raise ValueError(
                f"source {i} is a plain module but the datamodule has only {len(self.tasks)} tasks"
            )
        with torch.no_grad():
            width = model(example[:1]).shape[-1]
        if width not in (num_classes, len(self.tasks[i])):
            raise ValueError(
                f"source {i} outputs {width} logits: neither all {num_classes} classes (embedding head) "
                f"nor task {i}'s {len(self.tasks[i])} classes (linear head)"
            )
        return SourceHead(
            "embedding" if width == num_classes else "linear", tuple(self.tasks[i]), num_classes
        )

    def _build_metrics(self, num_classes: int) -> None:
        names = {"merged": frozenset().union(*[h.covered() for h in self.heads])}
        if self.evaluate_sources:
            names |= {f"source{i}": h.covered() for i, h in enumerate(self.heads)}
        if self.evaluate_ensemble:
            names["ensemble"] = frozenset().union(*[h.covered(own_only=True) for h in self.heads])
        self.metrics = nn.ModuleDict(
            {k: TaskAccuracies(self.tasks, num_classes, c) for k, c in names.items()}
        )

    def configure_callbacks(self) -> list[pl.Callback]:
        """The statistics pass, unless the trainer already has a ``MergeStatistics`` callback."""
        from lightning_merge.callbacks.statistics import MergeStatistics

        if not self.method.requires:
            return []
        if self._trainer is not None and any(isinstance(c, MergeStatistics) for c in self.trainer.callbacks):
            return []
        return [MergeStatistics(requires=sorted(self.method.requires), cache_path=self.stats_path)]

    # ------------------------------------------------------------------ data
    def calibration_dataloader(self) -> DataLoader:
        """The datamodule's calibration loader (statistics, graph tracing, BatchNorm reset)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        make = getattr(dm, "calibration_dataloader", None)
        if make is None:
            raise ValueError(
                f"the datamodule {type(dm).__name__} has no calibration_dataloader(): merging needs "
                "calibration data for the statistics, the graph trace and the BatchNorm reset"
            )
        return make()

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per task (its test images), sharded without padding across ranks."""
        dm = self._datamodule()
        loaders = [dm.task_test_dataloader(t) for t in range(len(self.tasks))]
        if self.trainer.world_size == 1:
            return loaders
        return [_unpadded(loader, self.trainer.global_rank, self.trainer.world_size) for loader in loaders]

    def _example_inputs(self) -> torch.Tensor:
        batch = next(iter(self.calibration_dataloader()), None)
        if batch is None:
            raise ValueError("the calibration dataloader is empty")
        return batch[0] if isinstance(batch, (tuple, list)) else batch

    def _calibration_inputs(self) -> Iterator[torch.Tensor]:
        """This rank's share of whole calibration batches (batch b goes to rank b mod W), on device.

        The BatchNorm reset runs in train mode, where every layer's input depends on the batch it came
        in: whole batches, summed across ranks, give the single-process statistics.
        """
        loader, rank, world = self.calibration_dataloader(), self.global_rank, self.trainer.world_size
        if world > 1 and len(loader) < world:
            raise ValueError(
                f"the calibration loader has {len(loader)} batches for {world} ranks; "
                "use a smaller batch size or more calibration samples"
            )
        for b, batch in enumerate(loader):
            if b % world == rank:
                yield (batch[0] if isinstance(batch, (tuple, list)) else batch).to(self.device)

    # ------------------------------------------------------------------ merge
    def on_validation_start(self) -> None:
        if self.merged is None:
            self.merged = self.merge()

    @torch.no_grad()
    def merge(self) -> nn.Module:
        """Run the method once (plus the BatchNorm reset); the result is equal on every rank."""
        with torch.inference_mode(False):
            kwargs: dict[str, Any] = {"graph": self.merge_graph, "stats": self.statistics}
            if self.base_model is not None:
                kwargs["base"] = self.base_model
            if self.method.needs_data:
                kwargs["data"] = self.calibration_dataloader()
            if self.method.requires:
                self.method.check_stats(self.statistics)
            self.merge_result = self.method.merge(list(self.sources), **kwargs)
            merged = self.merge_result.model.to(self.device)
            if self.repair == "rescale":
                trunk = merged.trunk if isinstance(merged, PartialZipModel) else merged
                graph, transforms = self.merge_graph, self.merge_result.transforms
                repair_rescale(trunk, list(self.sources), graph, transforms, self._calibration_inputs())
            if self.repair:
                reset_batchnorm(merged, self._calibration_inputs())
            self._agree_across_ranks(merged)
        return merged.eval().requires_grad_(False)

    def _agree_across_ranks(self, merged: nn.Module) -> None:
        """Every rank must hold rank 0's merged weights: compare digests, broadcast if they differ."""
        strategy = self.trainer.strategy
        if self.trainer.world_size == 1:
            return
        mine = model_fingerprint(merged)
        same = strategy.reduce_boolean_decision(mine == strategy.broadcast(mine, src=0), all=True)
        if same:
            return
        log.warning("merged weights differ across ranks; using rank 0's")
        state = strategy.broadcast({k: v.cpu() for k, v in merged.state_dict().items()}, src=0)
        merged.load_state_dict(state)

    # ------------------------------------------------------------------ evaluation
    def forward(self, x: torch.Tensor) -> Any:
        if self.merged is None:
            raise RuntimeError("the merge has not run yet: call trainer.validate(module, datamodule=...)")
        return self.merged(x)

    def validation_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        images, labels = batch
        self.metrics["merged"].update(merged_logits(self(images), self.heads), labels, dataloader_idx)
        if not (self.evaluate_sources or self.evaluate_ensemble):
            return
        outputs = [m(images) for m in self.sources]
        if self.evaluate_sources:
            for i, (out, head) in enumerate(zip(outputs, self.heads, strict=True)):
                self.metrics[f"source{i}"].update(head.to_global(out), labels, dataloader_idx)
        if self.evaluate_ensemble:
            self.metrics["ensemble"].update(ensemble_logits(outputs, self.heads), labels, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        """Compute (synced across ranks), log, report and export."""
        self.results = {
            f"{name}/{key}": value
            for name, metric in self.metrics.items()
            for key, value in metric.compute().items()
        }
        for metric in self.metrics.values():
            metric.reset()
        self.log_dict(
            {f"val/{k}": v for k, v in self.results.items()}, add_dataloader_idx=False, sync_dist=True
        )
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._report()
            if self.export_dir is not None:
                self.export(self.export_dir)

    def _report(self) -> None:
        from lightning_merge import reporting

        reporting.print_results(self.results, len(self.tasks))
        for logger in self.loggers:
            reporting.log_to_logger(
                logger, self.results, len(self.tasks), self.statistics, self.merge_graph, self.heatmaps
            )

    # ------------------------------------------------------------------ export
    def export(self, directory: str | os.PathLike) -> Path:
        """Write the merged model and its recipe to ``directory`` (see :mod:`lightning_merge.export`)."""
        from lightning_merge.export import export_merged

        if self.merged is None:
            raise RuntimeError("nothing to export: the merge has not run yet")
        return export_merged(self, directory)


def _describe(source: Source) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"


def _trace(model: nn.Module, example: torch.Tensor) -> Any:
    from lightning_merge.graph import trace_graph

    return trace_graph(model, example)


def _unpadded(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """The same loader over rank ``rank``'s share (every ``world_size``-th image, no repeats)."""
    sampler = UnrepeatedDistributedSampler(loader.dataset, num_replicas=world_size, rank=rank, shuffle=False)
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        persistent_workers=loader.persistent_workers,
    )
