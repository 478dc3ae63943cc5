"""What a merged model's BatchNorm reset costs next to a plain forward of that model.

    python benchmarks/reset_cost.py --calibration-size 500 --runs 3 --out benchmarks/results

The ZipIt! merge of the ResNet-20×1 test pair (``quick_pair``), full and partial (stop at 0.3), is
built once; then, interleaved and repeated, each model's eval-mode forward over the calibration
batches and its ``reset_batchnorm`` over the same batches (a train-mode forward with the BatchNorm
moments read from the layers' own computation) are timed. Issue 20 asks the reset to cost one forward
of the merged model, and the partial zip's reset no more than the full one's per forward.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import Column, command_line, machine_description, markdown_table, write_results  # noqa: E402
from perf import networks, perf_datamodule  # noqa: E402
from whole_merge import best_of, plain_forward, prepared, timed  # noqa: E402

from lightning_merge.apply.batchnorm_reset import reset_batchnorm  # noqa: E402
from lightning_merge.methods.zipit import ZipItMerge  # noqa: E402
from lightning_merge.models.training import quick_pair  # noqa: E402
from lightning_merge.pipeline.merge import run_method  # noqa: E402
from lightning_merge.stats.collect import collect_statistics  # noqa: E402

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def merged_models(calib: Batches) -> dict[str, nn.Module]:
    """ZipIt! full and partial@0.3 of the test pair, merged once (the sources' reset left out)."""
    models = [m.eval().requires_grad_(False) for m in networks(quick_pair("resnet20", width=1))]
    prep = prepared(models, calib[0][0])
    stats = collect_statistics(models, prep.graph, calib, requires=["moments"], progress=False)
    out = {}
    for label, stop in (("zipit", None), ("zipit partial@0.3", 0.3)):
        method = ZipItMerge(alpha=0.3, beta=0.125, stop_at=stop, reset_sources=False)
        out[label] = run_method(method, prep, stats, calib).model
    return out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    sources = quick_pair("resnet20", width=1)
    calib = [(x, y) for x, y, *_ in perf_datamodule(sources, args.calibration_size).calibration_dataloader()]
    models = merged_models(calib)
    fns = {}
    for label, model in models.items():
        fns[(label, "forward")] = lambda m=model: plain_forward([m.eval()], calib)
        fns[(label, "reset")] = lambda m=model: reset_batchnorm(m, calib)
    for fn in fns.values():
        fn()  # warm-up
    times: dict[tuple[str, str], list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(args.runs):
        for key, fn in fns.items():
            times[key].append(timed(fn))
    rows = []
    for label in models:
        fwd, rst = best_of(times[label, "forward"]), best_of(times[label, "reset"])
        rows.append(
            {"model": label, "forward_s": fwd[0], "reset_s": rst[0], "ratio_wall": rst[0] / fwd[0]}
            | {"ratio_cpu": rst[1] / fwd[1]}
        )
    return rows


COLUMNS = [
    Column("model", "merged model"),
    Column("forward_s", "best forward wall s", ".3f"),
    Column("reset_s", "best reset wall s", ".3f"),
    Column("ratio_wall", "reset ÷ forward (wall)", ".2f"),
    Column("ratio_cpu", "reset ÷ forward (CPU)", ".2f"),
]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--calibration-size", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for reset_cost.md/.json")
    args = parser.parse_args(argv)
    if min(args.runs, args.calibration_size) < 1:
        parser.error("--runs and --calibration-size must be positive")
    machine = machine_description("cpu")
    wall = time.perf_counter()
    rows = run(args)
    print(markdown_table(COLUMNS, rows))
    if args.out is not None:
        load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
        notes = (
            f"ResNet-20×1 test pair's ZipIt! merges (α=0.3, β=0.125), {args.calibration_size} calibration "
            f"images in memory, best of {args.runs} interleaved runs; forward = eval-mode forward of the "
            "merged model over the calibration batches (no_grad), reset = reset_batchnorm over the same "
            f"batches. {time.perf_counter() - wall:.0f} s in all; load average after the runs: {load}"
        )
        write_results(
            args.out,
            "reset_cost",
            title="BatchNorm reset vs a forward of the merged model",
            columns=COLUMNS,
            rows=rows,
            command=command_line("benchmarks/reset_cost.py", argv),
            machine=machine,
            notes=notes,
        )
    return rows


if __name__ == "__main__":
    main()
