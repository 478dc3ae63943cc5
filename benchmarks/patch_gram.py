"""Time a conv layer's input Gram XᵀX three ways, on the layer shapes of the ResNet-20×4 table, and
PLeaS' whole least-squares refit with and without the shifted windows.

    .venv/bin/python benchmarks/patch_gram.py --batch 500 --out benchmarks/results
    .venv/bin/python benchmarks/patch_gram.py --sections refit --out benchmarks/results
    .venv/bin/python benchmarks/patch_gram.py --sections strided --out benchmarks/results

"unfold": the patches as (B·H·W, 9C) rows (one copy) and one float64 product, which RegMean's
statistics and PLeaS' refit formed before; "sym": the same rows with only the block upper
triangle multiplied (:func:`~lightning_merge.stats.patch_gram.sym_gram`); "shift": one batched product
per kernel-offset difference (:func:`~lightning_merge.stats.patch_gram.input_gram`), no rows formed.
Inputs are random (the timing does not depend on the values); every layer is a 3×3, stride-1,
padding-1 conv. Each method gets one warm-up; the table reports the median of ``--runs``, and the
largest difference to "unfold" relative to its largest entry.

``refit``: PLeaS (w = 1.5) on real sources, matched and averaged, then
:func:`~lightning_merge.apply.least_squares.least_squares_refit` on one calibration batch twice from
the same start: with the stride-1 convs' sums from shifted windows (the default) and with every
layer's sums from unfolded patch rows (``SHIFT_MIN_ROWS`` raised past every layer). Written to
``patch_gram_refit.{md,json}`` with the largest relative difference of the refitted weights.

``strided``: the joint (two models side by side) input Gram of strided convs, from unfolded rows
(block upper triangle) and from the shifted products over the input's phases, each forced by
``STRIDED_MIN_WORK``; ``patch_gram_strided.{md,json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from lightning_merge.apply.least_squares import least_squares_refit
from lightning_merge.apply.module import build_merged_module
from lightning_merge.apply.weights import merge_state_dicts
from lightning_merge.data import TaskSplitDataModule
from lightning_merge.graph import trace_graph
from lightning_merge.methods import PLeaSMerge
from lightning_merge.stats import patch_gram
from lightning_merge.stats.collect import collect_statistics
from lightning_merge.stats.patch_gram import input_gram, sym_gram, unfolded_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_table as mt  # noqa: E402
from bench_io import Column, command_line, machine_description, write_results  # noqa: E402

#: (label, architecture, width, seed group, images in the refit batch) of the refit section.
REFITS = [
    ("ResNet-20×1, seeds 0:1", "resnet20", 1, (0, 1), 500),
    ("ResNet-20×4, seeds 4:5 (bf16-mixed sources)", "resnet20", 4, (4, 5), 100),
]

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


@contextlib.contextmanager
def overridden(name: str, value: int) -> Iterator[None]:
    """``lightning_merge.stats.patch_gram.<name>`` set to ``value`` inside the block (forces one path)."""
    saved = getattr(patch_gram, name)
    setattr(patch_gram, name, value)
    try:
        yield
    finally:
        setattr(patch_gram, name, saved)


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


#: (label, kernel, stride, padding, channels per model, images, spatial size) of the strided section:
#: ResNet-20×1's stride-2 layers (PLeaS' joint inputs, 500 calibration images), and stems and
#: stride-2 convs of torchvision nets at the zoo table's 64 px and at 224 px.
STRIDED = [
    ("ResNet-20×1 layer2.0.conv1", 3, 2, 1, 16, 500, 28),
    ("ResNet-20×1 layer3.0.conv1", 3, 2, 1, 32, 500, 14),
    ("7×7 stem, 64 px", 7, 2, 3, 3, 16, 64),
    ("7×7 stem, 224 px", 7, 2, 3, 3, 8, 224),
    ("ResNet-18 layer2.0.conv1, 64 px", 3, 2, 1, 64, 16, 16),
    ("ResNet-18 layer2.0.conv1, 224 px", 3, 2, 1, 64, 16, 56),
]


def strided_row(label: str, k: int, stride: int, pad: int, c: int, n: int, size: int, runs: int) -> dict:
    """Seconds of one joint strided-conv Gram from unfolded rows and from the phases' shifted products."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2 * c, 8, k, stride, pad)
    parts = [torch.randn(n, c, size, size) for _ in range(2)]
    out = {}
    for path, work in (("rows", 2**62), ("phases", 0)):
        with overridden("STRIDED_MIN_WORK", work):
            out[f"{path}_s"], out[path] = median_seconds(lambda: input_gram(conv, parts)[0], runs)
    default = "phases" if patch_gram.shifted_sums_apply(conv, parts[0], 2) else "rows"
    return {
        "layer": label,
        "shape": f"2 × {n}×{c}×{size}×{size}, {k}×{k} stride {stride}",
        "rows_s": out["rows_s"],
        "phases_s": out["phases_s"],
        "speedup": out["rows_s"] / out["phases_s"],
        "default": default,
        "err": float((out["phases"] - out["rows"]).abs().max() / out["rows"].abs().max()),
    }


def write_strided(rows: list[dict], argv: list[str] | None, out: str, runs: int) -> None:
    write_results(
        out,
        "patch_gram_strided",
        title="Joint input Gram of strided convs (float64): unfolded rows vs shifted products over phases",
        columns=[
            Column("layer", "layer"),
            Column("shape", "inputs"),
            Column("rows_s", "unfolded rows (s)", ".3f"),
            Column("phases_s", "phases (s)", ".3f"),
            Column("speedup", "rows / phases", ".2f"),
            Column("default", "taken by default"),
            Column("err", "max rel. diff", ".1e"),
        ],
        rows=rows,
        command=command_line("benchmarks/patch_gram.py", argv),
        machine=machine_description("cpu"),
        notes=(
            f"Two models' inputs side by side (PLeaS' joint_inputs); median of {runs} runs after a warm-up. "
            "'taken by default': the path input_gram takes (shifted_sums_apply: offset pairs must share "
            f"products, and rows × joint channels² ≥ STRIDED_MIN_WORK = {patch_gram.STRIDED_MIN_WORK}). 1×1 "
            "and non-overlapping strided kernels (ResNet shortcuts, ViT patch embeddings) share no products "
            "and always take the rows."
        ),
    )


def refit_row(label: str, arch: str, width: float, seeds: tuple[int, ...], images: int) -> dict:
    """Seconds of the PLeaS refit with shifted windows and with patch rows, from one merged start."""
    precision = "bf16-mixed" if width == 4 else None  # how the ×4 table's sources were trained
    sources = mt.group_sources(
        seeds, mt.SPLITS[2], arch, width, mt.DEFAULT_CACHE_DIR, mt.DEFAULT_ROOT, precision
    )
    models = [s.model.eval().requires_grad_(False) for s in sources]
    dm = TaskSplitDataModule(
        tasks=[list(t) for t in mt.SPLITS[2]], calibration_size=images, eval_batch_size=images
    )
    dm.setup()
    batches = [x for x, _ in dm.calibration_dataloader()]
    graph = trace_graph(models[0], batches[0][:2])
    method = PLeaSMerge(width=1.5, ridge=1e-4, refit=True)
    stats = collect_statistics(models, graph, batches, requires=sorted(method.requires), progress=False)
    with torch.no_grad():
        transforms = method.match(models, graph, stats)
        start = build_merged_module(
            models[0], merge_state_dicts([m.state_dict() for m in models], graph, transforms)
        )
    out = {}
    for path, min_rows in (("shift", patch_gram.SHIFT_MIN_ROWS), ("rows", 2**62)):
        merged = copy.deepcopy(start)
        with overridden("SHIFT_MIN_ROWS", min_rows):
            begin = time.perf_counter()
            least_squares_refit(merged, models, graph, transforms, batches, ridge=1e-4)
            out[f"{path}_s"] = time.perf_counter() - begin
        out[path] = merged.state_dict()
    diff = max(
        float((out["shift"][k] - v).norm() / v.norm().clamp_min(1e-12))
        for k, v in out["rows"].items()
        if v.is_floating_point()
    )
    return {
        "model": label,
        "images": images,
        "rows_s": out["rows_s"],
        "shift_s": out["shift_s"],
        "speedup": out["rows_s"] / out["shift_s"],
        "max_rel_diff": diff,
    }


def write_refit(rows: list[dict], argv: list[str] | None, out: str) -> None:
    write_results(
        out,
        "patch_gram_refit",
        title="PLeaS least-squares refit (w = 1.5): patch rows vs shifted windows",
        columns=[
            Column("model", "sources"),
            Column("images", "images"),
            Column("rows_s", "patch rows (s)", ".1f"),
            Column("shift_s", "shifted windows (s)", ".1f"),
            Column("speedup", "speed-up", ".1f"),
            Column("max_rel_diff", "max rel. weight diff", ".1e"),
        ],
        rows=rows,
        command=command_line("benchmarks/patch_gram.py", argv),
        machine=machine_description("cpu"),
        notes=(
            "Both refits start from the same matched and averaged model and fit every Linear/Conv2d in "
            "forward order on one calibration batch; 'patch rows' forms every layer's sums from unfolded "
            "patches, 'shifted windows' (the default) takes the stride-1 convs' sums from shifted windows "
            "of the input. The targets are mixed in float32 in both."
        ),
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=500, help="images per batch (the refit's batch)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per method (median)")
    p.add_argument("--out", default=None, help="folder for patch_gram.md / .json")
    p.add_argument(
        "--sections", nargs="+", choices=["gram", "refit", "strided"], default=["gram"], help="what to time"
    )
    args = p.parse_args(argv)
    if "refit" in args.sections:
        refits = [refit_row(*spec) for spec in REFITS]
        print(refits, flush=True)
        if args.out:
            write_refit(refits, argv, args.out)
    if "strided" in args.sections:
        strided = [strided_row(*spec, args.runs) for spec in STRIDED]
        print(strided, flush=True)
        if args.out:
            write_strided(strided, argv, args.out, args.runs)
    if "gram" not in args.sections:
        return
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
