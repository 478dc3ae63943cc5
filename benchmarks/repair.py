"""What REPAIR's rescaling adds, on sources without BatchNorm (where the BatchNorm reset does nothing).

    .venv/bin/python benchmarks/repair.py --arch mlp --width 1 --seeds 0:1 2:3 4:5

Every method row runs twice per seed group through ``merge_table.evaluate_merge`` (one
``MergeModule`` validation run each): ``repair=True`` (the BatchNorm reset only: a no-op for an MLP)
and ``repair="rescale"`` (REPAIR, :func:`lightning_merge.apply.repair.repair_rescale`, then the
reset). Sources are the table's (``merge_table.group_sources``: the default pair's training settings,
cached in ``artifacts/sources``), Fashion-MNIST 5+5, joint accuracy on the 10k test images; the
ensemble is the reference. Writes ``repair_<arch>x<w>.{md,json}``: mean ± std over the seed groups.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_table as mt  # noqa: E402
from bench_io import Column, command_line, machine_description, write_results  # noqa: E402

ROWS = ["average", "weight_matching", "permute", "zipit", "zipit partial@0.6", "mudsc", "pleas w=1.5"]
MODES = {"none": True, "rescale": "rescale"}


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Joint / per-task accuracy per (seed group, row, repair mode), plus the ensemble per group."""
    data = mt.datamodule_for(args)
    stats_dir = Path(args.stats_dir)
    stats_dir.mkdir(parents=True, exist_ok=True)
    stem = f"repair_{args.arch}x{args.width:g}"
    rows = [row for row in mt.method_rows(2, (0.6,), (1.5,)) if row[0] in ROWS]
    out: list[dict[str, Any]] = []
    for seeds in args.seeds:
        label = mt.seeds_label(seeds)
        sources = mt.group_sources(seeds, mt.SPLITS[2], args.arch, args.width, args.cache_dir, data.root)
        for i, (name, factory) in enumerate(rows):
            for mode, repair in MODES.items():
                method = factory()
                stats = mt.stats_file(stats_dir, stem, seeds, method, args.calibration_size)
                got, _ = mt.evaluate_merge(
                    name,
                    method,
                    sources,
                    data,
                    seeds=label,
                    stats_path=stats,
                    references=i == 0 and mode == "none",
                    repair=repair,
                )
                for row in got:
                    row["repair"] = mode if row["method"] == name else "reference"
                    print(
                        f"{label} {row['method']:>20} {row['repair']:>9}: {row['joint_acc']:.2f}",
                        flush=True,
                    )
                out += got
    return out


def summarise(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per method: mean ± std joint accuracy without and with REPAIR, and the mean gain."""

    def joints(method: str, mode: str) -> list[float]:
        return [r["joint_acc"] for r in raw if r["method"] == method and r["repair"] == mode]

    lines = [
        {
            "method": "ensemble",
            "none": mt.mean_std(joints("ensemble", "reference")),
            "rescale": "",
            "gain": None,
        }
    ]
    for method in ROWS:
        base, rep = joints(method, "none"), joints(method, "rescale")
        gains = [b - a for a, b in zip(base, rep, strict=True)]
        lines.append(
            {
                "method": method,
                "none": mt.mean_std(base),
                "rescale": mt.mean_std(rep),
                "gain": statistics.fmean(gains),
                "wins": f"{sum(g > 0 for g in gains)}/{len(gains)}",
            }
        )
    return lines


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="mlp", help="source architecture without BatchNorm (registry name)")
    p.add_argument("--width", type=float, default=1, help="source width multiplier")
    p.add_argument("--seeds", type=mt.parse_seeds, nargs="+", default=[(0, 1), (2, 3), (4, 5)])
    p.add_argument("--cache-dir", default=mt.DEFAULT_CACHE_DIR, help="source checkpoints (trained if absent)")
    p.add_argument("--stats-dir", default="artifacts/merge_table/stats", help="statistics files")
    p.add_argument("--out", default="benchmarks/results", help="where repair_*.md / .json go")
    p.add_argument("--root", default=mt.DEFAULT_ROOT, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--calibration-size", type=int, default=2000, help="images in the statistics pass")
    args = p.parse_args(argv)
    args.split = 2
    logging.getLogger("lightning_merge").setLevel(logging.WARNING)
    raw = run(args)
    lines = summarise(raw)
    write_results(
        args.out,
        f"repair_{args.arch}x{args.width:g}",
        title=f"REPAIR on {args.arch}×{args.width:g} (no BatchNorm), Fashion-MNIST 5+5: joint accuracy (%)",
        columns=[
            Column("method", "method"),
            Column("none", "without REPAIR"),
            Column("rescale", "with REPAIR"),
            Column("gain", "mean gain (points)", "+.2f"),
            Column("wins", "groups improved"),
        ],
        rows=lines,
        command=command_line("benchmarks/repair.py", argv),
        machine=machine_description("cpu"),
        notes=(
            f"Seed groups {', '.join(mt.seeds_label(s) for s in args.seeds)}; mean ± std over them. "
            "'without REPAIR' is the MergeModule's default (BatchNorm reset only, which has nothing to "
            "reset here); 'with REPAIR' is repair='rescale'."
        ),
        extra={"raw": raw},
    )
    return lines


if __name__ == "__main__":
    main()
