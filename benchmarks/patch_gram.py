"""Time a conv layer's input Gram XᵀX three ways, on the layer shapes of the ResNet-20×4 table.

    .venv/bin/python benchmarks/patch_gram.py --batch 500 --out benchmarks/results

"unfold": the patches as (B·H·W, 9C) rows (one copy) and one float64 product, which RegMean's
statistics and PLeaS' refit formed before; "sym": the same rows with only the block upper
triangle multiplied (:func:`~lightning_merge.stats.patch_gram.sym_gram`); "shift": one batched product
per kernel-offset difference (:func:`~lightning_merge.stats.patch_gram.input_gram`), no rows formed.
Inputs are random (the timing does not depend on the values); every layer is a 3×3, stride-1,
padding-1 conv. Each method gets one warm-up; the table reports the median of ``--runs``, and the
largest difference to "unfold" relative to its largest entry.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lightning_merge.stats.patch_gram import input_gram, sym_gram, unfolded_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import Column, command_line, machine_description, write_results  # noqa: E402

#: (label, channels, spatial size): the 3 ResNet-20×4 stages for a source (×1) and for the widest
#: PLeaS merge in the table (1.75 × the source width).
SHAPES = [
    ("stage 1, source", 64, 32),
    ("stage 2, source", 128, 16),
    ("stage 3, source", 256, 8),
    ("stage 1, PLeaS w=1.75", 112, 32),
    ("stage 2, PLeaS w=1.75", 224, 16),
    ("stage 3, PLeaS w=1.75", 448, 8),
]


def median_seconds(fn: Callable[[], torch.Tensor], runs: int) -> tuple[float, torch.Tensor]:
    out = fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench(label: str, channels: int, size: int, batch: int, runs: int) -> dict:
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    x = torch.randn(batch, channels, size, size)

    def unfold() -> torch.Tensor:
        rows = unfolded_rows(conv, x).to(torch.float64)
        return rows.T @ rows

    t_unfold, ref = median_seconds(unfold, runs)
    t_sym, sym = median_seconds(lambda: sym_gram(unfolded_rows(conv, x)), runs)
    t_shift, shift = median_seconds(lambda: input_gram(conv, x)[0], runs)
    scale = float(ref.abs().max())
    return {
        "layer": label,
        "shape": f"{batch}×{channels}×{size}×{size}",
        "unfold_s": t_unfold,
        "sym_s": t_sym,
        "shift_s": t_shift,
        "speedup": t_unfold / t_shift,
        "err_sym": float((sym - ref).abs().max()) / scale,
        "err_shift": float((shift - ref).abs().max()) / scale,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=500, help="images per batch (the refit's batch)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per method (median)")
    p.add_argument("--out", default=None, help="folder for patch_gram.md / .json")
    args = p.parse_args(argv)
    rows = []
    for shape in SHAPES:
        rows.append(bench(*shape, args.batch, args.runs))
        print(rows[-1], flush=True)
    if args.out:
        cols = [
            Column("layer", "layer"),
            Column("shape", "input"),
            Column("unfold_s", "unfold + product (s)", ".2f"),
            Column("sym_s", "unfold + upper blocks (s)", ".2f"),
            Column("shift_s", "shifted products (s)", ".2f"),
            Column("speedup", "unfold / shift", ".1f"),
            Column("err_shift", "max rel. diff (shift)", ".1e"),
        ]
        write_results(
            args.out,
            "patch_gram",
            title="Conv input Gram XᵀX (float64): unfolded rows vs shifted products",
            columns=cols,
            rows=rows,
            command=command_line("benchmarks/patch_gram.py", argv),
            machine=machine_description("cpu"),
            notes=(
                "3×3 stride-1 padding-1 convs at the ResNet-20×4 table's layer shapes; median of "
                f"{args.runs} runs after a warm-up. This is the product behind RegMean/MaTS Gram "
                "statistics and PLeaS' least-squares refit."
            ),
        )


if __name__ == "__main__":
    main()
