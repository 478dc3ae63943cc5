"""Same-base merges (task arithmetic, TIES, Fisher, RegMean, MaTS ×3) of two fine-tuned MLPs: a table.

    .venv/bin/python benchmarks/same_base.py --seeds 0:1:2 100:101:102 200:201:202

A seed group ``b:s0:s1`` trains one MLP base with seed ``b`` briefly on all 10 Fashion-MNIST classes,
then fine-tunes two copies of it with seeds ``s0`` / ``s1`` on classes 0–4 / 5–9 (checkpoints cached
in ``--cache-dir``). Each fine-tuned model's statistics (Gram matrices, diagonal Fisher, K-FAC) come from
``--calibration-size`` training images of its *own* task (``own_task_statistics``). Every merge and
every reference (the base, each fine-tuned model, their ensemble) is scored on the whole test set by
``lightning_merge.evaluation.evaluate_model``: joint (argmax over the 10 classes) and per task (argmax
within the task's 5 classes). Writes ``benchmarks/results/same_base_mlp.{md,json}``: mean ± std over
the seed groups in the table, each group's rows and the sources' training settings in the JSON.
``--converged`` trains the base and each fine-tune until its validation accuracy plateaus
(``merge_table.py --converged``'s rule and schedule, no batch cap) and writes ``same_base_mlp_converged``.

``tests/methods/test_same_base_fmnist.py`` runs :func:`run_group` on the test models' seeds.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import Column, command_line, machine_description, write_results  # noqa: E402
from merge_table import (  # noqa: E402
    converged_training,
    parse_seeds,
    seeds_label,
    sources_lines,
    training_facts,
)

from lightning_merge.cost import count_flops
from lightning_merge.data import TaskSplitDataModule
from lightning_merge.evaluation import SideBySide, SourceHead, evaluate_model, head_of
from lightning_merge.methods import (
    TIES,
    FisherMerge,
    MaTS,
    MergeMethod,
    RegMean,
    TaskArithmetic,
    method_config,
)
from lightning_merge.methods.same_base import own_task_statistics
from lightning_merge.models import SourceClassifier, train_source
from lightning_merge.models.training import cache_path, source_key

ARCH = "mlp"
TASKS = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
IMAGE = (1, 28, 28)
STEM = "same_base_mlp"
ACCURACIES = ("joint_acc", "task0_acc", "task1_acc", "avg_acc")
#: The reference rows, in table order, before the merges.
REFERENCES = ("base", "fine-tuned on 0–4", "fine-tuned on 5–9", "ensemble of the fine-tuned")
Row = dict[str, Any]
#: The three draws the test documents (``LIGHTNING_MERGE_TEST_SEED`` 0 / 100 / 200).
DEFAULT_SEEDS = [(0, 1, 2), (100, 101, 102), (200, 201, 202)]


@dataclass(frozen=True)
class Settings:
    """How the family is trained and the statistics gathered (the defaults are the test's set-up)."""

    width: float = 0.125  # hidden layers of 64 units
    base_batches: int = 40  # the base: one epoch capped at this many batches, all 10 classes
    tune_batches: int = 200  # each fine-tune: one epoch capped at this many batches of its task
    batch_size: int = 128
    calibration_size: int = 512  # own-task training images per fine-tuned model
    #: every model trained to a validation plateau (the batch caps then do not apply)
    converged: bool = False

    @property
    def stem(self) -> str:
        return STEM + ("_converged" if self.converged else "")


class Member(NamedTuple):
    """One model of a family: how it is trained (``init``: the weights it starts from, None: fresh)."""

    role: str
    seed: int
    classes: list[int]
    batches: int
    init: dict[str, torch.Tensor] | None


def merge_rows() -> list[tuple[str, Callable[[], MergeMethod]]]:
    """The merges in table order (label, factory): every same-base method the library has."""
    return [
        ("average (TA λ=1/2)", lambda: TaskArithmetic(scaling=0.5)),
        ("task arithmetic λ=1", lambda: TaskArithmetic(scaling=1.0)),
        ("TIES k=20 λ=1", lambda: TIES(k=20, scaling=1.0)),
        ("Fisher", lambda: FisherMerge()),
        ("RegMean α=0.9", lambda: RegMean(alpha=0.9)),
        ("MaTS regmean α=0.9", lambda: MaTS(subspace="regmean", alpha=0.9)),
        ("MaTS fisher", lambda: MaTS(subspace="fisher")),
        ("MaTS kfac", lambda: MaTS(subspace="kfac")),
    ]


def train_family(
    seeds: Sequence[int], settings: Settings, cache_dir: str | Path
) -> tuple[SourceClassifier, list[SourceClassifier], list[Row]]:
    """The base and its two fine-tuned copies (trained into ``cache_dir`` when absent), and each one's
    training record: role, seed, classes, epochs, batch cap, batch size and seconds (when recorded)."""
    if len(seeds) != 1 + len(TASKS):
        raise ValueError(f"a seed group is BASE:TUNE0:TUNE1, got {seeds_label(seeds)}")
    specs = [Member("base", seeds[0], list(range(10)), settings.base_batches, None)]
    base = _train(specs[0], settings, cache_dir)
    specs += [
        Member(f"fine-tuned on task {t}", seed, list(task), settings.tune_batches, base.state_dict())
        for t, (seed, task) in enumerate(zip(seeds[1:], TASKS, strict=True))
    ]
    tuned = [_train(spec, settings, cache_dir) for spec in specs[1:]]
    records = [_record(spec, settings, cache_dir) for spec in specs]
    return base, tuned, records


def _arguments(member: Member, settings: Settings) -> dict[str, Any]:
    """``train_source``'s arguments for ``member`` (also its cache key's, through ``source_key``)."""
    out = dict(
        arch=ARCH, classes=member.classes, seed=member.seed, width=settings.width,
        limit_train_batches=member.batches, batch_size=settings.batch_size, init_state_dict=member.init,
    )  # fmt: skip
    if settings.converged:
        t = converged_training()
        out |= {"limit_train_batches": None, "max_epochs": t.max_epochs, "plateau": t.plateau}
        out["schedule"] = t.schedule
    return out


def _train(member: Member, settings: Settings, cache_dir: str | Path) -> SourceClassifier:
    return train_source(**_arguments(member, settings), cache_dir=cache_dir)


def _record(member: Member, settings: Settings, cache_dir: str | Path) -> Row:
    """The member's training settings and, from the record beside its checkpoint, its training time (and,
    trained to a plateau, its epochs, validation curve and whether the rule was met)."""
    arguments = _arguments(member, settings)
    key = source_key(**arguments)
    facts = training_facts(cache_path(cache_dir, key))  # its classes and seed are the member's own
    return {
        "role": member.role,
        "seed": member.seed,
        "classes": member.classes,
        "epochs": key["max_epochs"],
        "batches": arguments["limit_train_batches"],
        "batch_size": settings.batch_size,
        "train_seconds": facts.get("train_seconds"),
        **facts,
    }


def own_task_loaders(data: TaskSplitDataModule, size: int) -> list[DataLoader]:
    """Task t's calibration loader: ``size`` of its training images, drawn with seed t."""
    loaders = []
    for t in range(len(TASKS)):
        images = data.dataset_for("train", t).images
        if size > len(images):
            raise ValueError(f"calibration size {size} exceeds task {t}'s {len(images)} training images")
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(t))[:size]
        loaders.append(DataLoader(images[pick], batch_size=128))
    return loaders


def score(model: nn.Module, data: TaskSplitDataModule, heads: Sequence[SourceHead]) -> Row:
    """Accuracies (%) on the test set: joint, each task's within its classes, their average."""
    loaders = [data.task_test_dataloader(t) for t in range(len(TASKS))]
    got = evaluate_model(model, loaders, TASKS, heads)
    acc = {k: 100 * got[k] for k in ("joint_acc", "task0_acc", "task1_acc")}
    return acc | {"avg_acc": (acc["task0_acc"] + acc["task1_acc"]) / 2}


def run_group(
    seeds: Sequence[int], data: TaskSplitDataModule, settings: Settings, cache_dir: str | Path
) -> tuple[list[Row], list[Row]]:
    """One seed group's rows (references, then every merge) and its sources' training records (with
    their accuracies, the same numbers as their rows)."""
    base, tuned, records = train_family(seeds, settings, cache_dir)
    nets = [m.model for m in tuned]
    example = data.dataset_for("test", 0).images[:1]
    heads = [head_of(i, m, TASKS, 10, example) for i, m in enumerate(tuned)]
    stats = own_task_statistics(nets, own_task_loaders(data, settings.calibration_size))
    group, one = seeds_label(seeds), count_flops(base.model, IMAGE)

    def row(label: str, model: nn.Module, config: dict[str, Any] | None, seconds: float | None) -> Row:
        out = {"seeds": group, "method": label, **score(model, data, heads)}
        out |= {"rel_flops": count_flops(model, IMAGE) / one, "merge_seconds": seconds, "config": config}
        print(f"seeds {group} {label:>26}: joint {out['joint_acc']:.2f}%", flush=True)
        return out

    references = [base.model, *nets, SideBySide(nets)]
    rows = [row(label, m, None, None) for label, m in zip(REFERENCES, references, strict=True)]
    for label, factory in merge_rows():
        method, start = factory(), time.perf_counter()
        merged = method.merge(nets, graph=None, stats=stats, base=base.model).model
        rows.append(row(label, merged, method_config(method), time.perf_counter() - start))
    for record, label in zip(records, REFERENCES[:3], strict=True):
        mine = next(r for r in rows if r["method"] == label)
        record |= {"seeds": group, "row": label, **{k: mine[k] for k in ACCURACIES}}
    return rows, records


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std over the seed groups (std None for one group; both None when any is None)."""
    if not values or any(v is None for v in values):
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def cell(mean: float | None, std: float | None, fmt: str = ".2f") -> str | None:
    """``mean ± std`` text of one table cell (None: no number, shown as a dash)."""
    if mean is None:
        return None
    return format(mean, fmt) if std is None else f"{mean:{fmt}} ± {std:{fmt}}"


def aggregate(rows: Sequence[Row]) -> list[Row]:
    """One row per method (table order): ``<key>_mean`` / ``<key>_std`` of every accuracy and the
    relative FLOPs over the seed groups, and the ``<key>`` cell text made from them."""
    order = [*REFERENCES, *(label for label, _ in merge_rows())]
    labels = [m for m in order if any(r["method"] == m for r in rows)]
    labels += sorted({r["method"] for r in rows} - set(labels))
    out = []
    for label in labels:
        sel = [r for r in rows if r["method"] == label]
        agg: Row = {"method": label, "groups": len(sel)}
        for key in (*ACCURACIES, "rel_flops"):
            mean, std = mean_std([r[key] for r in sel])
            shown = cell(mean, None if key == "rel_flops" else std)  # a cost does not vary by seed
            agg |= {f"{key}_mean": mean, f"{key}_std": std, key: shown}
        out.append(agg)
    return out


COLUMNS = (
    Column("method", "method"),
    Column("joint_acc", "joint"),
    Column("task0_acc", "task 0–4"),
    Column("task1_acc", "task 5–9"),
    Column("avg_acc", "task average"),
    Column("rel_flops", "rel. FLOPs"),
)


def notes(settings: Settings, groups: Sequence[str], records: Sequence[Row], hidden: int) -> str:
    """What the table measures, from the run's own settings and records."""
    base = next(r for r in records if r["role"] == "base")
    tuned = next(r for r in records if r["role"] != "base")
    spread = "mean ± std over seed groups" if len(groups) > 1 else "one seed group, so no std"
    if settings.converged:
        how = (
            "to a validation plateau (rule and epochs below) on all 10 Fashion-MNIST classes; two copies of "
            f"it are fine-tuned to a plateau on classes 0–4 and 5–9 (batches of {base['batch_size']}). "
        )
    else:
        how = (
            f"for {_epochs(base['epochs'])} capped at {base['batches']} batches of {base['batch_size']} on "
            f"all 10 Fashion-MNIST classes; two copies of it are fine-tuned for {_epochs(tuned['epochs'])} "
            f"capped at {tuned['batches']} batches of {tuned['batch_size']} on classes 0–4 and 5–9. "
        )
    return (
        f"Seed groups (base : fine-tune 0–4 : fine-tune 5–9): {', '.join(groups)}; {spread}. "
        f"An MLP ({ARCH} ×{settings.width:g}, hidden layers of {hidden} units) is trained as the base "
        + how
        + "Each fine-tuned "
        f"model's statistics (Gram matrices, diagonal Fisher, K-FAC) come from {settings.calibration_size} "
        "training images of its own task. Accuracies in % on the 10,000 test images: joint is the argmax "
        "over all 10 classes; task 0–4 / 5–9 the argmax within the task's classes on its images. "
        "The ensemble runs both fine-tuned models, each scoring its own task's classes (an MLP has no "
        "BatchNorm, so no reset treatment applies); rel. FLOPs: nonzero-weight FLOPs of one 28×28 image "
        "against the base. Each group's rows and the sources' training records are in the JSON."
    )


def training_lines(records: Sequence[Row]) -> list[str]:
    """``merge_table.sources_lines`` for the families: the rule, then per group base and fine-tunes."""
    training = converged_training().as_dict()
    groups: dict[str, list[Row]] = {}
    for r in records:
        groups.setdefault(r["seeds"], []).append(r)
    lines = sources_lines({"source_training": training, "sources": groups})
    return [lines[0].replace("Sources trained", "Base and fine-tunes trained"), *lines[1:]]


def _epochs(n: int) -> str:
    return f"{n} epoch" + "s" * (n != 1)


def row_settings(rows: Sequence[Row]) -> str:
    """``- label: `Class(args)``` for every merge row (its recorded configuration)."""
    lines = []
    for label, _ in merge_rows():
        config = next((r["config"] for r in rows if r["method"] == label and r.get("config")), None)
        if config:
            args = ", ".join(f"{k}={v}" for k, v in config.get("init_args", {}).items())
            lines.append(f"- {label}: `{config['name']}({args})`")
    return "\n".join(["Row settings:", "", *lines]) if lines else ""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Settings()
    p.add_argument(
        "--seeds", type=parse_seeds, nargs="+", default=DEFAULT_SEEDS, help="BASE:TUNE0:TUNE1 groups"
    )
    p.add_argument("--width", type=float, default=d.width, help="MLP width multiplier")
    p.add_argument("--base-batches", type=int, default=d.base_batches, help="base training batches")
    p.add_argument("--tune-batches", type=int, default=d.tune_batches, help="batches of each fine-tune")
    p.add_argument("--calibration-size", type=int, default=d.calibration_size, help="own-task images")
    p.add_argument("--cache-dir", default="artifacts/same_base/sources", help="source checkpoints")
    p.add_argument("--out-dir", default="benchmarks/results", help="where the json / md go")
    p.add_argument("--converged", action="store_true", help="train every model to a validation plateau")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> Settings:
    bad = [seeds_label(s) for s in args.seeds if len(s) != 1 + len(TASKS)]
    if bad:
        p.error(f"a seed group is BASE:TUNE0:TUNE1, got {bad}")
    for name in ("base_batches", "tune_batches", "calibration_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.width <= 0:
        p.error(f"--width must be positive, got {args.width}")
    return Settings(
        width=args.width, base_batches=args.base_batches, tune_batches=args.tune_batches,
        calibration_size=args.calibration_size, converged=args.converged,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser()
    args = p.parse_args(argv)
    settings = check_args(p, args)
    logging.getLogger("lightning_merge").setLevel(logging.WARNING)
    data = TaskSplitDataModule(tasks=[list(t) for t in TASKS])
    data.setup()
    rows: list[Row] = []
    records: list[Row] = []
    for seeds in args.seeds:
        got, rec = run_group(seeds, data, settings, args.cache_dir)
        rows, records = rows + got, records + rec
    hidden = next(m.out_features for m in SourceClassifier(arch=ARCH, width=settings.width).modules()
                  if isinstance(m, nn.Linear))  # fmt: skip
    groups = [seeds_label(s) for s in args.seeds]
    text = notes(settings, groups, records, hidden) + "\n\n" + row_settings(rows)
    if settings.converged:
        text += "\n\n" + "\n".join(training_lines(records))
    table = aggregate(rows)
    title = "Same-base merges: two fine-tuned copies of one MLP (Fashion-MNIST 5+5)"
    md, js = write_results(
        args.out_dir, settings.stem, title=title + (", converged" if settings.converged else ""),
        columns=COLUMNS, rows=table, command=command_line("benchmarks/same_base.py", argv),
        machine=machine_description("cpu"), notes=text.strip(),
        extra={"settings": asdict(settings), "groups": rows, "sources": records},
    )  # fmt: skip
    print(f"wrote {md} and {js}")
    return {"rows": table, "groups": rows, "sources": records}


if __name__ == "__main__":
    main()
