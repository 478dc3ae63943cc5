"""Effect of resetting the sources' BatchNorm statistics before the correlations (ZipIt!'s and MuDSC's
official pipelines do; ``reset_sources``), each merge through ``MergeModule`` on the quick_pair
ResNet-20 sources (the merged model gets its own BatchNorm reset in every row).

    python benchmarks/source_reset.py --arch resnet20 --calibration-size 500
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import Column, command_line, machine_description, write_results  # noqa: E402
from pleas_variants import run_module  # noqa: E402

from lightning_merge.data import TaskSplitDataModule  # noqa: E402
from lightning_merge.methods import MuDSCMerge, ZipItMerge  # noqa: E402
from lightning_merge.models import quick_pair  # noqa: E402

COLUMNS = [
    Column("method", "method"),
    Column("reset_sources", "sources' BatchNorm reset"),
    Column("joint_acc", "joint acc %", ".2f"),
    Column("avg_task_acc", "avg task acc %", ".2f"),
    Column("merge_s", "merge s", ".1f"),
]
ROWS = [
    ("zipit", True, lambda: ZipItMerge(reset_sources=True)),
    ("zipit", False, lambda: ZipItMerge(reset_sources=False)),
    ("mudsc λ=0.5", True, lambda: MuDSCMerge(reset_sources=True)),
    ("mudsc λ=0.5", False, lambda: MuDSCMerge(reset_sources=False)),
]


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--width", type=float, default=1.0, help="source width multiplier")
    p.add_argument("--calibration-size", type=int, default=500)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    sources = quick_pair(args.arch, width=args.width)
    tasks = TaskSplitDataModule(
        tasks=[list(s.classes) for s in sources], calibration_size=args.calibration_size
    )
    rows = []
    for label, reset, factory in ROWS:
        row, _ = run_module(factory(), list(sources), tasks, None)
        rows.append(row | {"method": label, "reset_sources": reset})
        print(rows[-1], flush=True)
        write_results(
            args.out,
            f"source_reset_{args.arch}x{args.width:g}",
            title=f"Sources' BatchNorm reset before the correlations, {args.arch}×{args.width:g} "
            f"(quick_pair sources), {args.calibration_size} calibration images",
            columns=COLUMNS,
            rows=rows,
            command=command_line(__file__, argv),
            machine=machine_description("cpu"),
        )


if __name__ == "__main__":
    main()
