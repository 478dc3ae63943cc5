"""PLeaS variants side by side on one pair of sources, through ``trainer.validate(MergeModule(...))``.

Rows: ZipIt! (w = 1, the reference for time), PLeaS with the published objective at uniform widths,
PLeaS under FLOPs budgets (per-merge-point widths from the solver), PLeaS with the propagated-input
refit, and PLeaS-free (statistics and BatchNorm reset on MNIST images, the sources trained on
Fashion-MNIST). FLOPs / parameters relative to one source count non-zero weights only, as the paper
does (``MergeResult.diagnostics["cost"]``: the refitted Linear/Conv layers). ``merge_s`` is the merge
as MergeModule runs it (statistics pass + method + BatchNorm reset), evaluation excluded.

    python benchmarks/pleas_variants.py --arch resnet20 --mnist-root .cache/mnist
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import Column, command_line, machine_description, write_results  # noqa: E402
from perf import quiet, quiet_trainer  # noqa: E402

from lightning_merge.data import MergeDataModule, TaskSplitDataModule  # noqa: E402
from lightning_merge.methods import MergeMethod, PLeaSMerge, ZipItMerge  # noqa: E402
from lightning_merge.models import quick_pair  # noqa: E402
from lightning_merge.module import MergeModule  # noqa: E402

COLUMNS = [
    Column("method", "method"),
    Column("calibration", "calibration"),
    Column("joint_acc", "joint acc %", ".2f"),
    Column("avg_task_acc", "avg task acc %", ".2f"),
    Column("rel_params", "params (non-zero) ×", ".3f"),
    Column("rel_flops", "FLOPs (non-zero) ×", ".3f"),
    Column("merge_s", "merge s", ".1f"),
]


def variants(
    widths: Sequence[float], budgets: Sequence[float]
) -> list[tuple[str, str, Callable[[], MergeMethod]]]:
    """(label, calibration, method factory) rows."""
    rows: list[tuple[str, str, Callable[[], MergeMethod]]] = [("zipit", "fmnist", ZipItMerge)]
    rows += [(f"pleas w={w:g}", "fmnist", lambda w=w: PLeaSMerge(width=w)) for w in widths]
    rows += [(f"pleas budget={b:g}", "fmnist", lambda b=b: PLeaSMerge(budget=b)) for b in budgets]
    rows.append(("pleas w=1.5 propagated", "fmnist", lambda: PLeaSMerge(width=1.5, objective="propagated")))
    rows.append(("pleas-free w=1.5", "mnist", lambda: PLeaSMerge(width=1.5)))
    return rows


def run(
    method: MergeMethod, sources: list, tasks: TaskSplitDataModule, calib: TaskSplitDataModule | None
) -> dict:
    return run_module(method, sources, tasks, calib)[0]


def run_module(
    method: MergeMethod, sources: list, tasks: TaskSplitDataModule, calib: TaskSplitDataModule | None
) -> tuple[dict, MergeModule]:
    """The row of one merge, and the module (its ``merged`` model)."""
    module = MergeModule(
        sources=sources, method=method, evaluate_sources=False, evaluate_ensemble=False, heatmaps=0
    )
    data = MergeDataModule(tasks, calibration=calib)
    setup, ends = module.setup, []

    def timed_setup(stage: str) -> None:  # the statistics callback's setup runs before this one
        setup(stage)
        ends.append(time.perf_counter())

    module.setup = timed_setup  # type: ignore[method-assign]
    with quiet():
        trainer = quiet_trainer("cpu")
        start = time.perf_counter()
        trainer.validate(module, datamodule=data, verbose=False)
    cost: dict[str, Any] = dict(module.result.diagnostics).get("cost", {}) if module.result else {}
    n = len(tasks.tasks)
    return {
        "joint_acc": 100 * module.results["merged/joint_acc"],
        "avg_task_acc": 100 * sum(module.results[f"merged/task{t}_acc"] for t in range(n)) / n,
        "rel_params": cost.get("params"),
        "rel_flops": cost.get("flops"),
        "merge_s": ends[0] - start,
    }, module


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--width", type=float, default=1.0, help="source width multiplier")
    p.add_argument("--calibration-size", type=int, default=1000)
    p.add_argument("--widths", type=float, nargs="+", default=[1.0, 1.25, 1.5, 1.75])
    p.add_argument("--budgets", type=float, nargs="+", default=[1.5, 1.75])
    p.add_argument("--mnist-root", default=".cache/mnist")
    p.add_argument("--rows", nargs="*", help="only these labels")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    sources = quick_pair(args.arch, width=args.width)
    tasks = TaskSplitDataModule(
        tasks=[list(s.classes) for s in sources], calibration_size=args.calibration_size
    )
    mnist = TaskSplitDataModule(dataset="mnist", root=args.mnist_root, calibration_size=args.calibration_size)
    rows = []
    for label, calib, factory in variants(args.widths, args.budgets):
        if args.rows and label not in args.rows:
            continue
        row = run(factory(), list(sources), tasks, mnist if calib == "mnist" else None)
        rows.append(row | {"method": label, "calibration": calib})
        print(rows[-1], flush=True)
        write_results(  # after every row: a long CPU run that is stopped keeps what it measured
            args.out,
            f"pleas_variants_{args.arch}x{args.width:g}",
            title=f"PLeaS variants, {args.arch}×{args.width:g}, Fashion-MNIST 5+5 (quick_pair sources)",
            columns=COLUMNS,
            rows=rows,
            command=command_line(__file__, argv),
            machine=machine_description("cpu"),
        )


if __name__ == "__main__":
    main()
