"""The ZipIt!-style results table on Fashion-MNIST: every merge method on groups of source models.

    .venv/bin/python benchmarks/merge_table.py --arch resnet20 --width 1 --split 2 --seeds 0:1 2:3 4:5
    .venv/bin/python benchmarks/merge_table.py --split 3 --seeds 0:1:2 3:4:5 6:7:8

``--split 2``: tasks [0..4] / [5..9]; ``--split 3``: [0,1,2] / [3,4,5] / [6..9]. A seed group
``a:b[:c]`` trains task t with seed number t of the group, with the settings of the default pair
(``lightning_merge.models.default_pair.DEFAULT_PAIR``) and its cache ``artifacts/sources``, so cached
sources load instead of training. Each row is one ``MergeModule`` validation run through the Python
API; the statistics pass runs once per seed group and set of statistics (one file each).

Resumable: rows already in the output JSON for the same seed group, label and method settings are
reused (``--fresh`` ignores them), and the outputs are rewritten after every row, so an interrupted
run continues where it stopped. A row that raises is recorded as failed (with the error) instead of
ending the run. Writes ``merge_table_<arch>x<w>_split<N>.{csv,json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import command_line, machine_description  # noqa: E402

from lightning_merge.callbacks.statistics import MergeStatistics  # noqa: E402
from lightning_merge.cost import Cost, cost
from lightning_merge.data import MergeDataModule, TaskSplitDataModule
from lightning_merge.data.datamodule import DEFAULT_ROOT
from lightning_merge.evaluation import (
    SCORING_TAGS,
    TREATED,
    MergeScores,
    SideBySide,
    check_scoring_models,
)
from lightning_merge.methods import (
    AlignedMerge,
    AverageMerge,
    MaTS,
    MergeMethod,
    MuDSCMerge,
    PermuteMerge,
    PLeaSMerge,
    RegMean,
    WeightMatchingMerge,
    ZipItMerge,
    method_config,
)
from lightning_merge.models import PlateauRule, SourceClassifier, source_record
from lightning_merge.models.classifier import PLATEAU_FACTOR, PLATEAU_FLOOR, PLATEAU_PATIENCE, SCHEDULES
from lightning_merge.models.default_pair import (
    DEFAULT_CACHE_DIR,
    DEFAULT_PAIR,
    SourceSpec,
    arch_spec,
    checkpoint_of,
    train_spec,
)
from lightning_merge.models.training import quiet_lightning
from lightning_merge.module import MergeModule

#: ``--split N`` → the N tasks (global class ids); 2 is the default pair's split.
SPLITS: dict[int, tuple[tuple[int, ...], ...]] = {
    2: tuple(s.classes for s in DEFAULT_PAIR),
    3: ((0, 1, 2), (3, 4, 5), (6, 7, 8, 9)),
}
LETTERS = "ABCDEFGHIJ"
MetricRow = dict[str, Any]
#: (row label, method factory); the arguments are those of configs/merge/*_fmnist_resnet20x1.yaml.
MethodRow = tuple[str, Callable[[], MergeMethod]]


@dataclass(frozen=True)
class SourceTraining:
    """How a table's sources are trained: ``max_epochs`` epochs, or until ``plateau`` says the
    validation accuracy has plateaued with ``max_epochs`` as the cap."""

    max_epochs: int = 1
    plateau: PlateauRule | None = None
    #: SourceClassifier's learning-rate schedule (None: the architecture's own, one-cycle for SGD)
    schedule: str | None = None

    def __post_init__(self) -> None:
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {self.max_epochs}")
        if self.plateau is not None and self.plateau.min_epochs > self.max_epochs:
            raise ValueError(f"min_epochs {self.plateau.min_epochs} exceeds max_epochs {self.max_epochs}")

    @property
    def suffix(self) -> str:
        """Output-stem suffix, so rows of differently trained sources never share a file."""
        if self.plateau is not None:
            return "_converged"
        return "" if self.max_epochs == 1 else f"_e{self.max_epochs}"

    def as_dict(self) -> dict[str, Any]:
        plateau = None if self.plateau is None else self.plateau.as_dict()
        out = {"max_epochs": self.max_epochs, "plateau": plateau}
        return out if self.schedule is None else out | {"schedule": self.schedule}


#: ``--converged``: the cap, and the schedule: the rate drops ×0.1 on each validation stall, twice,
#: and the plateau rule may stop training only once it is at that floor (so a flat curve is never a
#: high rate's stall). ``--plateau`` alone keeps the one-cycle schedule over the cap, and its rule may
#: stop from two thirds of the cap.
CONVERGED_MAX_EPOCHS = 30
CONVERGED_SCHEDULE = "plateau"


def converged_training() -> SourceTraining:
    """``--converged`` with nothing else given: the cap, the plateau rule and the step-down schedule
    (the other benchmark scripts' ``--converged`` too)."""
    return SourceTraining(CONVERGED_MAX_EPOCHS, PlateauRule(), CONVERGED_SCHEDULE)


def converged_min_epochs(max_epochs: int) -> int:
    return max(2, math.ceil(2 * max_epochs / 3))


def task_columns(num_tasks: int) -> list[str]:
    return [f"task_{t}_acc" for t in range(num_tasks)]


def accuracy_columns(num_tasks: int) -> list[str]:
    return ["joint_acc", *task_columns(num_tasks), "avg_task_acc"]


def columns(num_tasks: int) -> list[str]:
    """CSV columns: generic per-task accuracies, so 2- and 3-way tables share one layout."""
    return [
        "seeds",
        "method",
        *accuracy_columns(num_tasks),
        "phs_joint_acc",
        "rel_params",
        "rel_flops",
        "seconds",
        "stats",
        "error",
    ]


#: Label suffix of a reference given the merge's own treatment (BatchNorm reset on the calibration data).
RESET = " (reset)"
#: Scoring rules every row is scored under; the first is the one ``MergeModule`` logs.
SCORINGS = ("logits", "per_head_softmax")
#: The rule the tables' headline compares under (the other is reported beside it).
HEADLINE_SCORING = "logits"


def untreated_labels(num_tasks: int) -> list[str]:
    return [f"model {LETTERS[t]}" for t in range(num_tasks)] + ["ensemble"]


def reference_labels(num_tasks: int) -> list[str]:
    """The sources and their ensemble, untreated and given the merge's BatchNorm reset."""
    plain = untreated_labels(num_tasks)
    return plain + [f"{label}{RESET}" for label in plain]


def zip_settings(num_models: int) -> dict[str, float]:
    """ZipIt!'s α/β: the paper's two-model β = 0.125 can leave 3 models unable to reach width n."""
    return {"alpha": 0.3, "beta": 0.125 if num_models == 2 else 0.5}


def _factory(cls: Callable[..., MergeMethod], **kwargs: Any) -> Callable[[], MergeMethod]:
    """A fresh ``cls(**kwargs)`` per call (built inside the row, so a bad argument fails that row)."""
    return lambda: cls(**kwargs)


#: Rows whose label starts with this read their calibration data (statistics, BatchNorm resets) from
#: MNIST instead of the tasks' Fashion-MNIST images: PLeaS' data-free variant.
FREE_PREFIX = "pleas-free"


def method_rows(
    num_models: int = 2,
    stops: Sequence[float] = (0.3, 0.6),
    pleas_widths: Sequence[float] = (1.0, 1.25, 1.5, 1.75),
    pleas_budgets: Sequence[float] = (1.5, 1.75),
) -> list[MethodRow]:
    """The table's merge rows in order (``pleas_widths=()`` leaves PLeaS out: minutes per CPU merge).

    PLeaS rows: the published objective at uniform widths and under FLOPs budgets (per-layer widths
    from the solver), the propagated-input refit, and PLeaS-free (MNIST calibration); ZipIt! and MuDSC
    also without the sources' BatchNorm reset (``reset_sources=False``) and MuDSC with its λ search."""
    zip_ = zip_settings(num_models)
    rows: list[MethodRow] = [
        ("average", _factory(AverageMerge)),
        ("weight_matching", _factory(WeightMatchingMerge, max_iter=100, seed=0)),
        ("permute", _factory(PermuteMerge, anchor="first")),
        ("zipit", _factory(ZipItMerge, **zip_)),
        ("zipit no source reset", _factory(ZipItMerge, **zip_, reset_sources=False)),
    ]
    rows += [(f"zipit partial@{s:g}", _factory(ZipItMerge, **zip_, stop_at=s)) for s in stops]
    rows.append(("mudsc", _factory(MuDSCMerge, lam=0.5, matcher="zipit", **zip_)))
    rows.append(("mudsc no source reset", _factory(MuDSCMerge, lam=0.5, **zip_, reset_sources=False)))
    rows.append(("mudsc λ search", _factory(MuDSCMerge, lam_search=True, **zip_)))
    rows += [(f"pleas w={w:g}", _factory(PLeaSMerge, width=w, ridge=1e-4, refit=True)) for w in pleas_widths]
    if pleas_widths:
        rows += [(f"pleas budget={b:g}", _factory(PLeaSMerge, budget=b, ridge=1e-4)) for b in pleas_budgets]
        rows.append(("pleas w=1.5 propagated", _factory(PLeaSMerge, width=1.5, objective="propagated")))
        rows.append((f"{FREE_PREFIX} w=1.5", _factory(PLeaSMerge, width=1.5, ridge=1e-4)))
    rows.append(("zipit w=1.5", _factory(ZipItMerge, **zip_, width=1.5)))
    aligner = PermuteMerge(anchor="first")
    rows.append(("regmean (aligned)", _factory(AlignedMerge, aligner=aligner, merger=RegMean())))
    mats = MaTS(subspace="regmean", iterations=100)
    rows.append(("mats (aligned)", _factory(AlignedMerge, aligner=aligner, merger=mats)))
    return rows


def _row_matches(pattern: str, label: str) -> bool:
    """``=label`` matches that label only; any other pattern matches a label equal to or containing it."""
    if pattern.startswith("="):
        return label == pattern[1:]
    return pattern == label or pattern in label


def select_rows(rows: Sequence[MethodRow], patterns: Sequence[str] | None) -> list[MethodRow]:
    """Rows whose label matches one of ``patterns`` (None: all); unmatched patterns raise."""
    if not patterns:
        return list(rows)
    labels = [label for label, _ in rows]
    unknown = [p for p in patterns if not any(_row_matches(p, x) for x in labels)]
    if unknown:
        raise ValueError(f"--rows {unknown} match no row; the rows are {labels}")
    return [r for r in rows if any(_row_matches(p, r[0]) for p in patterns)]


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0:1"`` → ``(0, 1)``, ``"0:1:2"`` → ``(0, 1, 2)``: the seed of each task's source model."""
    parts = text.split(":")
    if len(parts) < 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"a seed group is SEED_A:SEED_B[:SEED_C] (e.g. 0:1), got {text!r}")
    return tuple(int(p) for p in parts)


def seeds_label(seeds: Sequence[int]) -> str:
    return ":".join(str(s) for s in seeds)


def source_width(width: float) -> int | float:
    """1.0 → 1: the cache key holds the width as given, and the sources are trained with ``width=1``."""
    return int(width) if float(width).is_integer() else float(width)


def group_specs(
    seeds: Sequence[int],
    tasks: Sequence[Sequence[int]],
    arch: str,
    width: float,
    precision: str | None = None,
    training: SourceTraining | None = None,
) -> list[SourceSpec]:
    """One spec per task (seed ``seeds[t]``), otherwise ``DEFAULT_PAIR``'s settings (same cache keys), or
    the architecture's own (``ARCH_TRAINING``: the ViT trains longer, with AdamW).

    ``precision`` is the sources' training precision (None: float32, the default pair's); ``training``
    their epochs and plateau rule (None: the default pair's single epoch)."""
    if len(seeds) != len(tasks):
        raise ValueError(f"seed group {seeds_label(seeds)} has {len(seeds)} seeds for {len(tasks)} tasks")
    epochs = {} if training is None else {"max_epochs": training.max_epochs, "plateau": training.plateau}
    specs = [
        arch_spec(tuple(task), seed, arch, source_width(width), precision=precision, **epochs)
        for task, seed in zip(tasks, seeds, strict=True)
    ]
    if training is None or training.schedule is None:
        return specs
    return [replace(s, model_kwargs={**s.model_kwargs, "schedule": training.schedule}) for s in specs]


def group_sources(
    seeds: Sequence[int],
    tasks: Sequence[Sequence[int]],
    arch: str,
    width: float,
    cache_dir: str | Path,
    root: str = DEFAULT_ROOT,
    precision: str | None = None,
    training: SourceTraining | None = None,
) -> list[SourceClassifier]:
    """The group's sources, loaded from ``cache_dir`` (trained there first when absent)."""
    specs = group_specs(seeds, tasks, arch, width, precision, training)
    return [train_spec(s, cache_dir, root) for s in specs]


#: What a results file keeps of each source's cache record (the training curve and how it ended).
SOURCE_FIELDS = (
    "classes", "seed", "max_epochs", "epochs", "val_acc_curve", "final_val_acc", "plateau_met",
    "stopped_by", "last_window_gain_points", "plateau", "train_seconds", "epoch_seconds",
)  # fmt: skip


def training_facts(checkpoint: Path) -> dict[str, Any]:
    """The training facts a checkpoint's cache record holds (:data:`SOURCE_FIELDS`: epochs, validation
    curve, final validation accuracy, whether the plateau rule was met); {} without a record."""
    record = source_record(checkpoint) or {}
    return {k: record[k] for k in SOURCE_FIELDS if k in record}


def group_records(specs: Sequence[SourceSpec], cache_dir: str | Path) -> list[dict[str, Any]]:
    """Per source of a seed group: its checkpoint name and its :func:`training_facts`."""
    out = []
    for spec in specs:
        path = checkpoint_of(spec, cache_dir)
        out.append({"checkpoint": path.name, "max_epochs": spec.max_epochs, **training_facts(path)})
    return out


def _row(
    seeds: str,
    label: str,
    acc: dict[str, float],
    num_tasks: int,
    rel: tuple[float, float],
    seconds: float,
    stats: str,
    config: dict | None,
) -> MetricRow:
    row: MetricRow = {"seeds": seeds, "method": label}
    for tag in SCORING_TAGS.values():  # a rule the row was not scored under gets no columns
        if f"{tag}joint_acc" in acc:
            tasks = [100 * acc[f"{tag}task{t}_acc"] for t in range(num_tasks)]
            row[f"{tag}joint_acc"] = 100 * acc[f"{tag}joint_acc"]
            row |= dict(zip([tag + c for c in task_columns(num_tasks)], tasks, strict=True))
            row[f"{tag}avg_task_acc"] = statistics.fmean(tasks)
    row |= {"rel_params": rel[0], "rel_flops": rel[1]}
    return row | {"seconds": seconds, "stats": stats, "error": None, "config": config}


def failed_row(seeds: str, label: str, error: BaseException, config: dict | None) -> MetricRow:
    """A row whose merge raised: no numbers, the error's type and message."""
    return {"seeds": seeds, "method": label, "error": f"{type(error).__name__}: {error}", "config": config}


def _metrics(results: dict[str, float], model: str) -> dict[str, float]:
    return {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith(f"{model}/")}


def _jsonable(config: dict) -> dict:
    """The config as it reads back from JSON (tuples → lists), so stored and fresh ones compare equal."""
    return json.loads(json.dumps(config, default=str))


def evaluate_merge(
    label: str,
    method: MergeMethod,
    sources: Sequence[nn.Module],
    datamodule: TaskSplitDataModule,
    *,
    seeds: str = "0:1",
    stats_path: str | None = None,
    references: bool = False,
    repair: bool | str = True,
    calibration: TaskSplitDataModule | None = None,
) -> tuple[list[MetricRow], MergeModule]:
    """One merge run → its table row (and, with ``references``, the source and ensemble rows first:
    untreated, and given the merge's BatchNorm reset when ``repair`` gives it one).

    Every row is scored under both rules (:data:`SCORINGS`: the ``MergeModule``'s logits, then the
    per-head softmax as ``phs_*`` columns, absent when a model has no class embedding to normalise).
    Relative parameters and FLOPs of every row, references included, come from
    :mod:`lightning_merge.cost` (nonzero weights only) against source 0; ``seconds`` is the whole run
    (statistics pass or cache load, merge, both evaluations, counts); ``stats`` says whether the
    statistics came from a ``"pass"``, the ``"cache"`` file or ``"none"``; ``calibration``: another data
    set's calibration images (PLeaS-free).
    """
    n = datamodule.num_tasks
    if len(sources) != n:
        raise ValueError(f"{len(sources)} sources for the data module's {n} tasks: give one source per task")
    start = time.perf_counter()
    pl.seed_everything(0, verbose=False)
    module = MergeModule(
        sources=list(sources),
        method=method,
        stats_path=stats_path,
        repair=repair,
        evaluate_sources=references,
        evaluate_ensemble=references,
        treated_references="all",
        scoring=SCORINGS[0],
        heatmaps=0,
    )
    data = MergeDataModule(datamodule, calibration=calibration)
    trainer = validate(module, data)
    results = dict(module.results)
    for scoring in SCORINGS[1:]:
        results |= rule_scores(module, data, scoring, references)
    shape = datamodule.image_shape
    base = cost(module.sources[0], shape)
    rel = cost(module.merged, shape).relative_to(base)
    seconds = time.perf_counter() - start
    stats = next((c.source for c in trainer.callbacks if isinstance(c, MergeStatistics)), None) or "none"
    config = _jsonable(method_config(method))
    rows = [_row(seeds, label, _metrics(results, "merged"), n, rel, seconds, stats, config)]
    if references:
        rows = reference_rows(module, results, seeds, n, shape, base) + rows
    return rows, module


def validate(module: MergeModule, data: MergeDataModule) -> pl.Trainer:
    """``trainer.validate`` on one CPU device, quietly; the trainer (its callbacks say where the
    statistics came from)."""
    with quiet_lightning(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            enable_progress_bar=False,
        )
        trainer.validate(module, datamodule=data, verbose=False)
    return trainer


@torch.no_grad()
def rule_scores(
    module: MergeModule, data: MergeDataModule, scoring: str, references: bool
) -> dict[str, float]:
    """The merge (and with ``references`` every source, treated source and both ensembles) scored under
    ``scoring`` on the same test loaders, one forward per model and batch; ``{}`` when a model cannot be
    scored that way (e.g. an embedding head without a ``ClassEmbedding`` under the per-head softmax)."""
    heads, sources = module.prepared.heads, list(module.sources)
    try:
        check_scoring_models(scoring, module.merged, sources, heads)
    except ValueError:
        return {}
    treated = list(module.treated) if references else []
    scores = MergeScores(
        heads, data.tasks, sources=references, ensemble=references, scoring=scoring,
        treated_sources=bool(treated), treated_ensemble=bool(treated),
    )  # fmt: skip
    for model in [module.merged, *sources, *treated]:
        model.eval()  # Lightning puts the module back in training mode after validate
    for task in range(len(data.tasks)):
        for batch in data.task_dataloader(task):
            scores.score_batch(module.merged, sources, treated, batch, task)
    return scores.compute()


def reference_rows(
    module: MergeModule,
    results: dict[str, float],
    seeds: str,
    num_tasks: int,
    shape: Sequence[int],
    base: Cost,
) -> list[MetricRow]:
    """Each source and the ensemble, untreated and given the merge's treatment (when it had one), with
    their own nonzero-weight costs (the ensemble's is its sources' side by side)."""
    rows = []
    kinds = (("", "", list(module.sources)), (RESET, TREATED, list(module.treated)))
    for suffix, key_suffix, models in kinds:
        named = [(f"model {LETTERS[t]}", f"source{t}", m) for t, m in enumerate(models)]
        named += [("ensemble", "ensemble", SideBySide(models))] if models else []
        for name, key, model in named:
            acc = _metrics(results, key + key_suffix)
            if acc:
                rel = cost(model, shape).relative_to(base)
                rows.append(_row(seeds, name + suffix, acc, num_tasks, rel, 0.0, "none", None))
    return rows


def stats_file(stats_dir: Path, stem: str, seeds: Sequence[int], method: MergeMethod, size: int) -> str:
    """One statistics file per seed group, set of statistics and source treatment (``reset``: the
    sources' BatchNorm reset first), so rows never overwrite each other's."""
    needs = "-".join(sorted(method.requires)) or "none"
    reset = "_reset" if method.reset_sources else ""
    return str(stats_dir / f"{stem}_s{'-'.join(map(str, seeds))}_{needs}{reset}_cal{size}.safetensors")


def free_stats(path: str) -> str:
    """The statistics file of a :data:`FREE_PREFIX` row: another calibration data set, another file."""
    return path.removesuffix(".safetensors") + "_mnist.safetensors"


class ResultStore:
    """The rows of one output stem: reused from its JSON when present, rewritten after every row.

    ``borrow``: other result JSONs (e.g. a sweep borrowing the table's PLeaS rows) whose rows with the
    same seeds, label and method settings are copied in instead of being recomputed, marked with
    ``"borrowed_from"``; unless ``fresh``.
    """

    def __init__(
        self, stem: Path, meta: dict[str, Any], fresh: bool = False, borrow: Sequence[Path] = ()
    ) -> None:
        self.stem, self.meta = stem, meta
        path = self.file(".json")
        on_disk = json.loads(path.read_text()) if path.is_file() else {}
        old = {} if fresh else on_disk
        #: with ``fresh``, the rows on disk at the start are replaced, never taken back in on a save
        self.replaced = {_row_key(r) for r in on_disk.get("rows", [])} if fresh else set()
        self.rows: list[MetricRow] = list(old.get("rows", []))
        self.commands: list[str] = [c for c in old.get("commands", []) if c != meta["command"]]
        self.commands.append(meta["command"])
        self.borrowed: list[MetricRow] = []
        self.mine: set[tuple[str, str]] = set()  # rows this run computed (or borrowed)
        #: per seed group, its sources' training records (epochs, validation curve; ``group_records``)
        self.sources: dict[str, list[dict[str, Any]]] = dict(old.get("sources", {}))
        for other in () if fresh else borrow:
            if Path(other).is_file():
                rows = json.loads(Path(other).read_text()).get("rows", [])
                self.borrowed += [{**r, "borrowed_from": Path(other).name} for r in rows]

    def find(self, seeds: str, label: str, config: dict | None = None) -> MetricRow | None:
        """A successful row for ``(seeds, label)`` with the same method settings, stored or borrowed."""
        for rows in (self.rows, self.borrowed):
            for r in rows:
                same = r["seeds"] == seeds and r["method"] == label and not r.get("error")
                if same and (config is None or r.get("config") == _jsonable(config)):
                    if rows is self.borrowed:
                        self.put([r])
                    return r
        return None

    def put(self, rows: Iterable[MetricRow]) -> None:
        for row in rows:
            self.rows = [r for r in self.rows if (r["seeds"], r["method"]) != (row["seeds"], row["method"])]
            self.rows.append(row)
            self.mine.add((row["seeds"], row["method"]))

    def save(self, order: Sequence[str], title: str, num_tasks: int) -> None:
        """Write the three files, first taking in rows another run wrote to them since we read them
        (two runs on different rows of one table then keep both; our own rows win a clash)."""
        with _locked(self.stem.parent):
            self._take_in_disk_rows()
            rows = ordered(self.rows, order)
            meta = {**self.meta, "command": self.commands[-1], "commands": self.commands, "rows": rows}
            if self.sources:
                meta["sources"] = self.sources
            self.file(".json").write_text(json.dumps(meta, indent=2))
            write_summaries(self.stem, meta, title, num_tasks)

    def _take_in_disk_rows(self) -> None:
        path = self.file(".json")
        disk = json.loads(path.read_text()) if path.is_file() else {}
        theirs = [
            r
            for r in disk.get("rows", [])
            if (r["seeds"], r["method"]) not in self.mine and _row_key(r) not in self.replaced
        ]
        keys = {(r["seeds"], r["method"]) for r in theirs}
        self.rows = theirs + [r for r in self.rows if (r["seeds"], r["method"]) not in keys]
        commands = [c for c in disk.get("commands", []) if c not in self.commands]
        self.commands = commands + self.commands
        self.sources = {**disk.get("sources", {}), **self.sources}

    def file(self, suffix: str) -> Path:
        return stem_file(self.stem, suffix)


def _row_key(row: MetricRow) -> str:
    """A row's identity as stored (every field), to recognise rows that were on disk at the start."""
    return json.dumps(row, sort_keys=True)


def stem_file(stem: Path, suffix: str) -> Path:
    """``<stem><suffix>``: appended, since a stem like ``..._vgg11_bnx0.5_split2`` has a dot."""
    return stem.parent / f"{stem.name}{suffix}"


def write_summaries(stem: Path, meta: dict[str, Any], title: str, num_tasks: int) -> None:
    """The .csv and .md of a table from its JSON content (``meta`` with its ``rows``)."""
    write_csv(meta["rows"], stem_file(stem, ".csv"), num_tasks)
    stem_file(stem, ".md").write_text(summary_markdown(meta["rows"], meta, title))


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``folder`` while its result files are rewritten."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def ordered(rows: Sequence[MetricRow], order: Sequence[str]) -> list[MetricRow]:
    """Seed groups in first-seen order, each in ``order`` (labels not in it last, as stored)."""
    groups = list(dict.fromkeys(r["seeds"] for r in rows))
    rank = {label: i for i, label in enumerate(order)}
    return sorted(rows, key=lambda r: (groups.index(r["seeds"]), rank.get(r["method"], len(rank))))


def run_group(
    seeds: Sequence[int],
    rows: Sequence[MethodRow],
    datamodule: TaskSplitDataModule,
    sources: Callable[[], Sequence[nn.Module]],
    stats_path: Callable[[MergeMethod], str],
    store: ResultStore,
    save: Callable[[], None],
    echo: Callable[[str], None] = print,
    free_calibration: Callable[[], TaskSplitDataModule] | None = None,
) -> None:
    """Every row for one seed group, reusing the stored ones; sources and ensemble scored once.
    ``free_calibration`` gives the other data set's module for the :data:`FREE_PREFIX` rows."""
    group = seeds_label(seeds)
    refs = reference_labels(datamodule.num_tasks)
    loaded: list[Sequence[nn.Module]] = []
    for label, factory in rows:
        try:
            method = factory()
        except Exception as err:  # e.g. a method not registered yet: record it, go on
            store.put([failed_row(group, label, err, None)])
            echo(f"seeds {group} {label:>20}: failed ({err})")
            save()
            continue
        config = method_config(method)
        need_refs = not all(store.find(group, r) for r in refs)
        if store.find(group, label, config) and not need_refs:
            echo(f"seeds {group} {label:>20}: reused")
            continue
        if not loaded:
            loaded.append(sources())
        free = label.startswith(FREE_PREFIX)
        try:
            if free and free_calibration is None:
                raise ValueError(f"row {label!r} needs another data set's calibration images; none given")
            got, _ = evaluate_merge(
                label,
                method,
                loaded[0],
                datamodule,
                seeds=group,
                stats_path=free_stats(stats_path(method)) if free else stats_path(method),
                references=need_refs and not free,
                calibration=free_calibration() if free and free_calibration else None,
            )
        except Exception as err:  # a failing method is a result too; the table goes on
            got = [failed_row(group, label, err, _jsonable(config))]
        store.put(got)
        for r in got:
            done = f"failed: {r['error']}" if r.get("error") else f"joint {r['joint_acc']:.2f}%"
            echo(f"seeds {group} {r['method']:>20}: {done}  ({r.get('seconds', 0):.0f} s)")
        save()


def write_csv(rows: Sequence[MetricRow], path: Path, num_tasks: int) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns(num_tasks), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def short_error(error: str, limit: int = 70) -> str:
    first = error.splitlines()[0] if error else "unknown error"
    return first if len(first) <= limit else first[: limit - 1] + "…"


def _mean_of(rows: Sequence[MetricRow], label: str, column: str) -> float:
    """Mean of ``column`` over ``label``'s successful rows (NaN when there are none)."""
    values = [r[column] for r in rows if r["method"] == label and not r.get("error")]
    return statistics.fmean(values) if values else math.nan


def mean_joint(rows: Sequence[MetricRow], label: str) -> float:
    """Mean joint accuracy of ``label`` over its successful rows (NaN when there are none)."""
    return _mean_of(rows, label, "joint_acc")


def missing_groups(rows: Sequence[MetricRow]) -> dict[str, list[str]]:
    """Per method, the table's seed groups it has no row for yet (a resumed run may stop midway)."""
    groups = list(dict.fromkeys(r["seeds"] for r in rows))
    have: dict[str, set[str]] = {}
    for r in rows:
        have.setdefault(r["method"], set()).add(r["seeds"])
    return {m: [g for g in groups if g not in seen] for m, seen in have.items()}


def verdict(rows: Sequence[MetricRow], num_tasks: int) -> dict[str, Any]:
    """The best merge by joint accuracy (any cost) and the merges not above averaging. Comparisons
    with the ensemble are :func:`headline`'s (equal treatment, at a FLOPs budget)."""
    refs = set(reference_labels(num_tasks))
    merges = [m for m in dict.fromkeys(r["method"] for r in rows) if m not in refs]
    missing = missing_groups(rows)
    complete = [m for m in merges if not missing.get(m)]  # means over different groups don't compare
    scored = {m: mean_joint(rows, m) for m in complete}
    scored = {m: v for m, v in scored.items() if not math.isnan(v)}
    best = max(scored, key=scored.get, default=None)
    average = scored.get("average", math.nan)
    per_task = {m: _mean_of(rows, m, "avg_task_acc") for m in scored}
    return {
        "best": best,
        "best_joint": scored.get(best, math.nan) if best else math.nan,
        "not_above_average": [m for m, v in scored.items() if m != "average" and not v > average],
        # joint accuracy rewards a merge that collapses onto one task (about half that task's
        # accuracy), so averaging is also compared on the mean of the per-task accuracies
        "not_above_average_tasks": [
            m for m, v in per_task.items() if m != "average" and not v > per_task.get("average", math.nan)
        ],
        "failed": [m for m in complete if m not in scored],
        "incomplete": [m for m in merges if missing.get(m)],
        "has_average": not math.isnan(average),
    }


#: FLOPs budgets of the headline, in multiples of one source's FLOPs.
BUDGETS = (1.0, 2.0)
_TOL = 1e-9


def _ok_rows(rows: Sequence[MetricRow], label: str) -> list[MetricRow]:
    return [r for r in rows if r["method"] == label and not r.get("error")]


def _complete_mean(rows: Sequence[MetricRow], label: str, key: str, groups: Sequence[str]) -> float:
    """Mean of ``key`` over ``label``'s rows when it has a successful row with ``key`` in every group of
    ``groups`` (NaN otherwise: a mean over fewer groups does not compare)."""
    ok = {r["seeds"]: r[key] for r in _ok_rows(rows, label) if r.get(key) is not None}
    return statistics.fmean(ok[g] for g in groups) if groups and all(g in ok for g in groups) else math.nan


def _max_flops(rows: Sequence[MetricRow], label: str) -> float:
    """A method's cost: its largest relative FLOPs over the seed groups (a budget must hold in each)."""
    flops = [r["rel_flops"] for r in _ok_rows(rows, label) if r.get("rel_flops") is not None]
    return max(flops) if flops else math.nan


def headline(
    rows: Sequence[MetricRow],
    num_tasks: int,
    scoring: str = HEADLINE_SCORING,
    budgets: Sequence[float] = BUDGETS,
) -> dict[str, Any]:
    """Per FLOPs budget, the best merge costing at most that many sources' FLOPs (its largest relative
    FLOPs over the seed groups) and its joint accuracy under ``scoring`` as a fraction of the equally
    treated ensemble's (the sources given the merge's BatchNorm reset). ``passes`` is true only when the
    merge is above that ensemble at no more than the ensemble's FLOPs; with no treated ensemble on
    every seed group there is no fraction and no pass. Means are over all the table's seed groups."""
    if scoring not in SCORING_TAGS:
        raise ValueError(f"scoring must be one of {list(SCORING_TAGS)}, got {scoring!r}")
    key = f"{SCORING_TAGS[scoring]}joint_acc"
    groups = list(dict.fromkeys(r["seeds"] for r in rows))
    refs = set(reference_labels(num_tasks))
    treated, untreated = (_complete_mean(rows, f"ensemble{s}", key, groups) for s in (RESET, ""))
    ensemble_flops = _max_flops(rows, f"ensemble{RESET}")
    merges = {m: _complete_mean(rows, m, key, groups) for m in dict.fromkeys(r["method"] for r in rows)}
    merges = {m: v for m, v in merges.items() if m not in refs and not math.isnan(v)}
    picks = []
    for budget in budgets:
        within = {m: v for m, v in merges.items() if _max_flops(rows, m) <= budget + _TOL}
        best = max(within, key=within.get, default=None)
        joint = within.get(best, math.nan)
        flops = _max_flops(rows, best) if best else math.nan
        passes = bool(best) and joint > treated and flops <= ensemble_flops + _TOL  # NaN compares False
        picks.append(
            {"budget": budget, "method": best, "joint": joint, "rel_flops": flops}
            | {"of_treated_ensemble": joint / treated if best else math.nan, "passes": passes}
        )
    return {
        "scoring": scoring,
        "treated_ensemble": treated,
        "untreated_ensemble": untreated,
        "ensemble_flops": ensemble_flops,
        "picks": picks,
    }


RULE_NAMES = {"logits": "raw logits", "per_head_softmax": "per-head softmax"}


def headline_lines(
    rows: Sequence[MetricRow],
    num_tasks: int,
    scoring: str = HEADLINE_SCORING,
    budgets: Sequence[float] = BUDGETS,
) -> list[str]:
    """The headline sentences: per budget, the best merge as a fraction of the equally treated ensemble
    under ``scoring``, then the same fractions under the other rule."""
    h = headline(rows, num_tasks, scoring, budgets)
    rule = RULE_NAMES[scoring]
    if math.isnan(h["treated_ensemble"]):
        lines = [
            f"No equally treated ensemble (sources given the merge's BatchNorm reset) on every seed group "
            f"under {rule}: no merge is compared with the ensemble."
        ]
    else:
        lines = [
            f"Equally treated ensemble ({rule}): joint {h['treated_ensemble']:.2f}% at "
            f"{h['ensemble_flops']:.2f}× a source's FLOPs (untreated: {h['untreated_ensemble']:.2f}%)."
        ]
    for pick in h["picks"]:
        lines.append(_pick_sentence(pick, rule))
    others = [s for s in SCORING_TAGS if s != scoring]
    for other in others:
        o = headline(rows, num_tasks, other, budgets)
        parts = [
            f"≤ {p['budget']:g}×: {p['method']} {100 * p['of_treated_ensemble']:.1f}%"
            for p in o["picks"]
            if p["method"] and not math.isnan(p["of_treated_ensemble"])
        ]
        if parts:
            lines.append(f"Under {RULE_NAMES[other]}, of its treated ensemble: {'; '.join(parts)}.")
    return lines


def _pick_sentence(pick: dict[str, Any], rule: str) -> str:
    where = f"at ≤ {pick['budget']:g}× a source's FLOPs"
    if not pick["method"]:
        return f"No merge {where} on every seed group."
    text = f"Best merge {where}: **{pick['method']}** ({pick['rel_flops']:.2f}×), joint {pick['joint']:.2f}%"
    if math.isnan(pick["of_treated_ensemble"]):
        return text + "."
    verdict_text = (
        "above the equally treated ensemble at no more than its FLOPs"
        if pick["passes"]
        else "not above the equally treated ensemble"
    )
    share = f"{100 * pick['of_treated_ensemble']:.1f}%"
    return f"{text} = {share} of the equally treated ensemble's ({rule}): {verdict_text}."


def beats_average(v: dict[str, Any]) -> str:
    """Which merges beat weight averaging, on joint accuracy and on the per-task average."""

    def said(lose: Sequence[str]) -> str:
        return "every merge" if not lose else f"all but {', '.join(lose)}"

    return (
        f"on joint accuracy {said(v['not_above_average'])}; "
        f"on the per-task average {said(v['not_above_average_tasks'])}"
    )


def _cells(sel: Sequence[MetricRow], num_tasks: int, is_ref: bool) -> list[str]:
    ok = [r for r in sel if not r.get("error")]
    if not ok:
        return [f"failed: {short_error(sel[0]['error'])}"] + ["–"] * (num_tasks + 5)
    cells = [mean_std([r[c] for r in ok]) for c in accuracy_columns(num_tasks)]
    phs = [r.get("phs_joint_acc") for r in ok]
    cells.append("–" if None in phs else mean_std(phs))
    cells += [mean_std([r[c] for r in ok]) for c in ("rel_params", "rel_flops")]
    cells.append("–" if is_ref else f"{statistics.fmean(r['seconds'] for r in ok):.0f}")
    return cells


def _settings(rows: Sequence[MetricRow]) -> list[str]:
    """One line per merge row: the method and its arguments (α/β included), from the stored config."""
    out = []
    for label in dict.fromkeys(r["method"] for r in rows):
        config = next((r["config"] for r in rows if r["method"] == label and r.get("config")), None)
        if config:
            out.append(f"- {label}: `{_call_text(config, config['name'])}`")
    return out


def _call_text(config: dict[str, Any], name: str) -> str:
    """``name(k=v, ...)``; a nested method config reads as ``ClassName(k=v, ...)``."""
    args = []
    for k, v in config.get("init_args", {}).items():
        if isinstance(v, dict) and "class_path" in v:
            v = _call_text(v, v["class_path"].rpartition(".")[2])
        args.append(f"{k}={v}")
    return f"{name}({', '.join(args)})"


def _precision_note(meta: dict[str, Any]) -> str:
    """A sentence when the sources were not trained in float32 (merges always run in float32)."""
    precision = meta.get("train_precision", "32-true")
    if precision == "32-true":
        return ""
    return f" Sources trained with Lightning precision `{precision}`; merging and evaluation in float32."


def _intro(meta: dict[str, Any], groups: Sequence[str]) -> list[str]:
    num_tasks = len(meta["tasks"])
    tasks = " : ".join(str(list(t)) for t in meta["tasks"])
    return [
        f"Seed groups (task {tasks}): {', '.join(groups)}; "
        + ("mean ± std over seed groups." if len(groups) > 1 else "one seed group, so no std."),
        "Accuracies in % on the Fashion-MNIST test set (joint: argmax over all 10 classes, raw logits; "
        "task X: argmax within the task's classes on its images; phs joint: ZipIt!'s per-head softmax of "
        "cosine × 100 scores, in log space). `(reset)` rows: the sources (and their ensemble) given the "
        "merge's own BatchNorm reset on the calibration images, the equal treatment. Relative params / "
        "FLOPs against source A, every row counted the same way (nonzero weights only, "
        "lightning_merge.cost, one 28×28 image; a partial zip counts trunk + "
        f"{num_tasks} tails, the ensemble its {num_tasks} sources side by side). s / run: one "
        "MergeModule validation (statistics pass when the seed group has none yet, merge, BatchNorm "
        "reset, 10k test images) and the second scoring rule." + _precision_note(meta),
    ]


def sources_lines(meta: dict[str, Any]) -> list[str]:
    """How the sources were trained and, per seed group, each one's epochs, final validation accuracy
    and whether its curve met the plateau rule (from their cache records)."""
    training = meta.get("source_training") or {"max_epochs": 1, "plateau": None}
    rule = training.get("plateau")
    cap = training["max_epochs"]
    how = (
        f"until validation accuracy gained < {rule['min_gain']:g} points over the last "
        f"{rule['window']:g} of the epochs (from epoch {rule['min_epochs']}, at most {cap})"
        if rule
        else f"for {cap} epoch{'s' * (cap != 1)} (no plateau rule)"
    )
    if training.get("schedule") == "plateau":
        drops = round(math.log(PLATEAU_FLOOR) / math.log(PLATEAU_FACTOR))
        how += (
            f"; learning rate ×{PLATEAU_FACTOR:g} on each validation stall ({PLATEAU_PATIENCE + 1} epochs "
            f"without a gain), {drops} times, and the rule applied only at that floor rate"
        )
    lines = [f"Sources trained {how}."]
    for group, records in meta.get("sources", {}).items():
        parts = []
        for r in records:
            acc = r.get("final_val_acc")
            info = f"{r.get('epochs', r.get('max_epochs'))} ep"
            info += f", val {100 * acc:.2f}%" if acc is not None else ""
            info += f", plateau {'met' if r['plateau_met'] else 'NOT met'}" if "plateau_met" in r else ""
            parts.append(info)
        lines.append(f"- seeds {group}: " + "; ".join(parts))
    return lines


def summary_markdown(rows: Sequence[MetricRow], meta: dict[str, Any], title: str) -> str:
    """Mean ± std over seed groups of every column, the headline, each row's settings, the sources'
    training, the command and the machine."""
    num_tasks = len(meta["tasks"])
    refs = reference_labels(num_tasks)
    groups = list(dict.fromkeys(r["seeds"] for r in rows))
    note = [meta["note"], ""] if meta.get("note") else []
    lines = [f"# {title}", "", *note, *_intro(meta, groups), ""]
    lines += [
        "| method | joint | " + " | ".join(f"task {LETTERS[t]}" for t in range(num_tasks)) + " | avg | "
        "phs joint | rel. params | rel. FLOPs | s / run |",
        "|---" * (num_tasks + 7) + "|",
    ]
    missing = missing_groups(rows)
    for m in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == m]
        failed = sum(bool(r.get("error")) for r in sel)
        name = m if not failed or failed == len(sel) else f"{m} ({failed} of {len(sel)} failed)"
        if missing[m]:
            name += f" (seeds {', '.join(r['seeds'] for r in sel)} only)"
        lines.append(f"| {name} | " + " | ".join(_cells(sel, num_tasks, m in refs)) + " |")
    v = verdict(rows, num_tasks)
    lines += ["", *headline_lines(rows, num_tasks, meta.get("headline_scoring", HEADLINE_SCORING))]
    if v["has_average"]:
        lines.append(f"Beats weight averaging: {beats_average(v)}.")
    if v["incomplete"]:
        lines.append(
            f"Not yet run on every seed group, so left out of the comparisons above: {v['incomplete']}."
        )
    lines += ["", *sources_lines(meta), "", "Row settings:", "", *_settings(rows), "", "Commands:", ""]
    lines += ["```", *meta.get("commands", [meta["command"]]), "```", "", f"Machine: {meta['machine']}", ""]
    return "\n".join(lines)


def table_stem(arch: str, width: float, split: int) -> str:
    return f"merge_table_{arch}x{width:g}_split{split}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet20", help="source architecture (registry name)")
    p.add_argument("--width", type=float, default=1, help="source width multiplier")
    p.add_argument("--split", type=int, choices=sorted(SPLITS), default=2, help="number of tasks / models")
    p.add_argument(
        "--seeds",
        "--pairs",
        dest="seeds",
        type=parse_seeds,
        nargs="+",
        default=None,
        help="seed groups, one seed per task: 0:1 ... (split 2) or 0:1:2 ... (split 3)",
    )
    p.add_argument("--stops", type=float, nargs="+", default=[0.3, 0.6], help="partial-zip depths")
    p.add_argument(
        "--pleas-widths", type=float, nargs="+", default=[1.0, 1.25, 1.5, 1.75], help="PLeaS merged widths"
    )
    p.add_argument(
        "--pleas-budgets", type=float, nargs="+", default=[1.5, 1.75], help="PLeaS FLOPs budgets (× a source)"
    )
    p.add_argument(
        "--mnist-root",
        default=".cache/mnist",
        help="MNIST IDX files for the PLeaS-free row (scripts/setup.sh puts them in .cache/mnist)",
    )
    p.add_argument("--no-pleas", action="store_true", help="leave the PLeaS rows out")
    p.add_argument(
        "--rows",
        nargs="+",
        default=None,
        help="only rows whose label equals / contains these (=LABEL: that label only)",
    )
    p.add_argument(
        "--note", default=None, help="a sentence printed under the table's title (kept in the JSON)"
    )
    p.add_argument("--fresh", action="store_true", help="ignore rows already in the output JSON")
    p.add_argument(
        "--render", action="store_true", help="only rewrite the .csv/.md from the stored JSON (runs nothing)"
    )
    p.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="source checkpoints (trained if absent)")
    p.add_argument("--stats-dir", default="artifacts/merge_table/stats", help="statistics files")
    p.add_argument("--out-dir", default="benchmarks/results", help="where the csv / json / md go")
    p.add_argument("--root", default=DEFAULT_ROOT, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--calibration-size", type=int, default=2000, help="images in the statistics pass")
    p.add_argument(
        "--max-epochs", type=int, default=None, help="sources' epochs (the cap with --plateau; default 1)"
    )
    p.add_argument("--plateau", action="store_true", help="train sources until val accuracy plateaus")
    p.add_argument(
        "--min-epochs", type=int, default=None, help="first epoch the plateau rule may stop at (2/3 of cap)"
    )
    p.add_argument(
        "--converged",
        action="store_true",
        help=f"converged sources: --plateau with --max-epochs {CONVERGED_MAX_EPOCHS} unless given",
    )
    p.add_argument(
        "--schedule",
        choices=SCHEDULES,
        default=None,
        help=f"sources' LR schedule (default: the arch's; {CONVERGED_SCHEDULE!r} with --converged)",
    )
    p.add_argument(
        "--train-precision",
        default=None,
        help="Lightning precision for training missing sources (e.g. bf16-mixed); part of their cache key",
    )
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parsed arguments; seed groups must hold one seed per task of the split."""
    p = parser()
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = [tuple(range(args.split))]
    bad = [seeds_label(s) for s in args.seeds if len(s) != args.split]
    if bad:
        p.error(f"--split {args.split} needs {args.split} seeds per group (one per task), got {bad}")
    if args.no_pleas:
        args.pleas_widths = []
    try:
        args.training = source_training(args)
    except ValueError as err:
        p.error(str(err))
    try:
        rows = method_rows(args.split, args.stops, args.pleas_widths, args.pleas_budgets)
        args.method_rows = select_rows(rows, args.rows)
    except ValueError as err:
        p.error(str(err))
    return args


def source_training(args: argparse.Namespace) -> SourceTraining:
    """``--max-epochs`` / ``--plateau`` / ``--min-epochs`` / ``--converged`` → the sources' training."""
    plateau = args.plateau or args.converged
    default = CONVERGED_MAX_EPOCHS if args.converged else 1
    max_epochs = args.max_epochs if args.max_epochs is not None else default
    if args.min_epochs is not None and not plateau:
        raise ValueError("--min-epochs is the plateau rule's: give --plateau or --converged with it")
    schedule = args.schedule or (CONVERGED_SCHEDULE if args.converged else None)
    if not plateau:
        return SourceTraining(max_epochs, schedule=schedule)
    default_min = PlateauRule().min_epochs if schedule == "plateau" else converged_min_epochs(max_epochs)
    min_epochs = args.min_epochs if args.min_epochs is not None else default_min
    return SourceTraining(max_epochs, PlateauRule(min_epochs=min_epochs), schedule)


def datamodule_for(args: argparse.Namespace) -> TaskSplitDataModule:
    return TaskSplitDataModule(
        root=args.root,
        tasks=[list(t) for t in SPLITS[args.split]],
        eval_batch_size=500,
        calibration_size=args.calibration_size,
        calibration_seed=0,
    )


def mnist_calibration(args: argparse.Namespace) -> TaskSplitDataModule:
    """MNIST images for the PLeaS-free row's statistics and BatchNorm resets (labels unused)."""
    return TaskSplitDataModule(
        root=args.mnist_root,
        dataset="mnist",
        tasks=[list(t) for t in SPLITS[args.split]],
        calibration_size=args.calibration_size,
        calibration_seed=0,
    )


def table_title(arch: str, width: float, split: int) -> str:
    return f"Merging {arch}×{width:g} on Fashion-MNIST, {split} tasks"


def render(stem: Path, note: str | None = None) -> list[MetricRow]:
    """Rewrite ``stem``'s .csv and .md from its JSON alone (after a change to the summary's wording);
    a ``note`` replaces the table's note in the JSON too (no row changes)."""
    path = stem_file(stem, ".json")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the table first")
    with _locked(stem.parent):
        meta = json.loads(path.read_text())
        if note is not None:
            meta["note"] = note
            path.write_text(json.dumps(meta, indent=2))
        split = len(meta["tasks"])
        write_summaries(stem, meta, table_title(meta["arch"], meta["width"], split), split)
    return meta["rows"]


def table_meta(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """What a table's JSON records besides its rows: command, machine, sources' architecture and training."""
    return {
        "command": command_line("benchmarks/merge_table.py", argv),
        "machine": machine_description(),
        "arch": args.arch,
        "width": args.width,
        "split": args.split,
        "tasks": [list(t) for t in SPLITS[args.split]],
        "zip": zip_settings(args.split),
        "train_precision": args.train_precision or "32-true",
        "source_training": args.training.as_dict(),
        "headline_scoring": HEADLINE_SCORING,
        **({"note": args.note} if args.note else {}),
    }


def check_same_training(store: ResultStore, meta: dict[str, Any]) -> None:
    """Rows of sources trained another way must not be reused (or mixed in) as if they were these."""
    path = store.file(".json")
    stored = json.loads(path.read_text()).get("source_training") if path.is_file() else None
    if stored is not None and store.rows and stored != meta["source_training"]:
        raise SystemExit(
            f"{path} holds rows of sources trained with {stored}, not {meta['source_training']}: "
            "pass --fresh to replace them or --out-dir for a separate table"
        )


def main(argv: list[str] | None = None) -> list[MetricRow]:
    args = parse_args(argv)
    name = table_stem(args.arch, args.width, args.split) + args.training.suffix
    if args.render:
        return render(Path(args.out_dir) / name, args.note)
    logging.getLogger("lightning_merge").setLevel(logging.WARNING)
    data = datamodule_for(args)
    stats_dir, out_dir = Path(args.stats_dir), Path(args.out_dir)
    stats_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = SPLITS[args.split]
    meta = table_meta(args, argv)
    store = ResultStore(out_dir / name, meta, fresh=args.fresh)
    check_same_training(store, meta)
    every = method_rows(args.split, args.stops, args.pleas_widths, args.pleas_budgets)
    order = reference_labels(args.split) + [label for label, _ in every]
    title = table_title(args.arch, args.width, args.split)

    def load(seeds: Sequence[int]) -> list[SourceClassifier]:
        models = group_sources(
            seeds, tasks, args.arch, args.width, args.cache_dir, data.root, args.train_precision,
            training=args.training,
        )  # fmt: skip
        specs = group_specs(seeds, tasks, args.arch, args.width, args.train_precision, args.training)
        store.sources[seeds_label(seeds)] = group_records(specs, args.cache_dir)
        return models

    start = time.perf_counter()
    for seeds in args.seeds:
        run_group(
            seeds,
            args.method_rows,
            data,
            lambda s=seeds: load(s),
            lambda m, s=seeds: stats_file(stats_dir, name, s, m, args.calibration_size),
            store,
            lambda: store.save(order, title, args.split),
            free_calibration=lambda: mnist_calibration(args),
        )
    store.save(order, title, args.split)
    print(f"wrote {out_dir / name}.{{csv,json,md}} in {time.perf_counter() - start:.0f} s")
    return store.rows


if __name__ == "__main__":
    main()
