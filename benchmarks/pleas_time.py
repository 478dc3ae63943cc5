"""PLeaS' merge time against ZipIt!'s on the same sources and calibration data (issue 18: within 2×).

Rows, each a full ``MergeModule`` merge through ``trainer.validate`` (timed: statistics pass +
method + BatchNorm reset, evaluation excluded): ZipIt! (w = 1), PLeaS published at w = 1.5 with the
``joint_inputs`` products in float32 (the default for float32 sources), and the same with float64
products (``lightning_merge.stats.joint_inputs.MIN_PRODUCTS``). The float64 row is the exact
reference: the table gives the largest relative weight difference of the float32 merge against it
(per tensor, max |Δ| / max |w|) and both accuracies. Rows alternate over ``--repeats`` rounds so a
changing machine load hits every row alike; the ratio is per round.

    python benchmarks/pleas_time.py --arch resnet20 --calibration-size 500
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
from lightning_merge.methods import PLeaSMerge, ZipItMerge  # noqa: E402
from lightning_merge.models import quick_pair  # noqa: E402
from lightning_merge.stats import joint_inputs  # noqa: E402

COLUMNS = [
    Column("round", "round"),
    Column("method", "method"),
    Column("products", "joint_inputs products"),
    Column("merge_s", "merge s", ".1f"),
    Column("ratio", "÷ ZipIt! (same round)", ".2f"),
    Column("joint_acc", "joint acc %", ".2f"),
    Column("avg_task_acc", "avg task acc %", ".2f"),
    Column("weight_diff", "max rel. weight diff vs float64", ".1e"),
]


def max_relative_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest per-tensor max |a − b| / max |b| over the floating-point state."""
    sb = b.state_dict()
    worst = 0.0
    for k, v in a.state_dict().items():
        if v.is_floating_point() and v.numel():
            ref = sb[k].double()
            worst = max(worst, float((v.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)))
    return worst


def one_round(r: int, sources: list, tasks: TaskSplitDataModule) -> list[dict]:
    rows, merged = [], {}
    for label, products, factory in (
        ("zipit", "–", ZipItMerge),
        ("pleas w=1.5", "float32", lambda: PLeaSMerge(width=1.5)),
        ("pleas w=1.5", "float64", lambda: PLeaSMerge(width=1.5)),
    ):
        saved = joint_inputs.MIN_PRODUCTS
        joint_inputs.MIN_PRODUCTS = torch.float64 if products == "float64" else torch.float32
        try:
            row, module = run_module(factory(), sources, tasks, None)
        finally:
            joint_inputs.MIN_PRODUCTS = saved
        merged[products] = module.merged
        rows.append(row | {"round": r, "method": label, "products": products})
    for row in rows:
        row["ratio"] = row["merge_s"] / rows[0]["merge_s"]
    rows[1]["weight_diff"] = max_relative_diff(merged["float32"], merged["float64"])
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--width", type=float, default=1.0, help="source width multiplier")
    p.add_argument("--calibration-size", type=int, default=500)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    sources = quick_pair(args.arch, width=args.width)
    tasks = TaskSplitDataModule(
        tasks=[list(s.classes) for s in sources], calibration_size=args.calibration_size
    )
    rows: list[dict] = []
    for r in range(args.repeats):
        rows += one_round(r, list(sources), tasks)
        print(*rows[-3:], sep="\n", flush=True)
        write_results(
            args.out,
            f"pleas_time_{args.arch}x{args.width:g}",
            title=f"PLeaS vs ZipIt! merge time, {args.arch}×{args.width:g}, {args.calibration_size} "
            "calibration images (quick_pair sources)",
            columns=COLUMNS,
            rows=rows,
            command=command_line(__file__, argv),
            machine=machine_description("cpu"),
        )


if __name__ == "__main__":
    main()
