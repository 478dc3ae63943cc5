"""Whole-merge time of every method against a plain forward of the sources over the same images.

    python benchmarks/whole_merge.py --calibration-size 1000 --runs 2 --out benchmarks/results

Sources: the cached ResNet-20×1 test pair (``quick_pair("resnet20")``, tasks 0-4 / 5-9). The
calibration images are loaded into memory once, so neither side pays for data loading. "forward" is
every source over every calibration batch under ``torch.no_grad``; a method's "merge" is what a
``MergeModule`` runs between loading and scoring: the sources' BatchNorm reset for the methods whose
``reset_sources`` is on (ZipIt!'s and MuDSC's default, as in their official pipelines: one forward
of every source over the calibration batches), the statistics pass its ``requires`` name
(``collect_statistics``), the method's merge (match + apply, PLeaS' refit included) and the
post-merge passes (``post_merge`` with ``repair=True``: BatchNorm reset). Runs interleave (forward,
then every method, repeated), so all see the same machine load; the table reports the best run and
ratio = merge / forward. ``--slow-runs`` caps the runs of the methods named in ``--slow`` (PLeaS).
``--flops`` adds each method's FLOPs over the forward's on the first calibration batch (torch's FLOP
counter: convolutions and matrix products, float64 ones included; solves and the matchers' loops are
not counted): the floor under the time ratio, whatever the kernels. ``--references`` also times the
named methods with the equally treated references ``MergeModule`` scores by default (rows
"<label> + references"): a method that reset its sources hands them over as those references, the
others reset copies of the sources then, so a source reset costs a MergeModule run nothing extra.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import Column, command_line, machine_description, markdown_table, write_results  # noqa: E402
from merge_table import method_rows  # noqa: E402
from perf import networks, perf_datamodule  # noqa: E402
from stats_pass import flops  # noqa: E402

from lightning_merge.methods.base import MergeMethod  # noqa: E402
from lightning_merge.models.training import quick_pair  # noqa: E402
from lightning_merge.pipeline.merge import post_merge, run_method, treat_references  # noqa: E402
from lightning_merge.pipeline.prepare import PreparedSources, reset_source_batchnorm  # noqa: E402
from lightning_merge.stats.collect import collect_statistics  # noqa: E402
from lightning_merge.stats.store import model_fingerprint  # noqa: E402

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def prepared(models: Sequence[nn.Module], example: torch.Tensor) -> PreparedSources:
    """The checked-sources record ``run_method`` / ``post_merge`` read (graph traced once)."""
    from lightning_merge.graph import trace_graph

    return PreparedSources(
        models=list(models),
        labels=[f"source{i}" for i in range(len(models))],
        heads=[],
        fingerprints=[model_fingerprint(m) for m in models],
        architecture=None,
        graph=trace_graph(models[0], example[:2]),
    )


def whole_merge(
    method: MergeMethod, sources: PreparedSources, calib: Batches, references: bool = False
) -> None:
    """The sources' BatchNorm reset where the method asks for it (ZipIt!, MuDSC: ``reset_sources``),
    statistics pass, merge (match, apply, refit) and post-merge passes, as MergeModule runs them;
    ``references``: then the equally treated references MergeModule scores by default (the sources
    given the merge's BatchNorm reset), which reuse the sources' reset when the method made one."""
    untreated = sources
    if getattr(method, "reset_sources", False):
        sources = reset_source_batchnorm(sources, calib)
    stats = None
    if method.requires:
        stats = collect_statistics(
            sources.models, sources.graph, calib, requires=sorted(method.requires), progress=False
        )
    result = run_method(method, sources, stats, calib)
    post_merge(result, sources, calib, repair=True)
    if references and sources is untreated:
        treat_references(untreated.models, calib, repair=True)


def plain_forward(models: Sequence[nn.Module], calib: Batches) -> None:
    with torch.no_grad():
        for x, _ in calib:
            for m in models:
                m(x)


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def best_of(runs: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """The fastest (wall, CPU) seconds over interleaved runs, each taken separately."""
    return min(t[0] for t in runs), min(t[1] for t in runs)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Interleaved runs; one row per method with its best wall/CPU seconds and ratios."""
    sources = quick_pair("resnet20", width=1)
    models = [m.eval().requires_grad_(False) for m in networks(sources)]
    dm = perf_datamodule(sources, args.calibration_size)
    calib = [(x, y) for x, y, *_ in dm.calibration_dataloader()]
    prep = prepared(models, calib[0][0])
    wanted = None if args.methods is None else set(args.methods.split(","))
    methods = [
        (label, make) for label, make in method_rows(pleas_widths=(1.5,)) if wanted is None or label in wanted
    ]
    slow = set(args.slow.split(",")) if args.slow else set()
    refs = set(args.references.split(",")) if args.references else set()
    variants = [(label, make, False) for label, make in methods]
    variants += [(f"{label} + references", make, True) for label, make in methods if label in refs]

    def runs_on(batches: Batches) -> dict[str, Callable[[], object]]:
        """The forward and every variant over ``batches``, by label."""
        fns: dict[str, Callable[[], object]] = {"forward": lambda: plain_forward(models, batches)}
        for label, make, with_refs in variants:
            fns[label] = lambda make=make, r=with_refs: whole_merge(make(), prep, batches, references=r)
        return fns

    fns = runs_on(calib)
    plain_forward(models, calib)  # warm-up
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for r in range(args.runs):
        for label, fn in fns.items():
            if r >= args.slow_runs and any(label.startswith(s) for s in slow):
                continue
            times[label].append(timed(fn))
            print(f"run {r} {label}: {times[label][-1][0]:.2f} s", flush=True)
    best = {k: (*best_of(v), len(v)) for k, v in times.items()}
    fwd = best["forward"]
    rows = [
        {
            "method": k,
            "runs": n,
            "wall_s": w,
            "cpu_s": c,
            "ratio_wall": w / fwd[0],
            "ratio_cpu": c / fwd[1],
        }
        for k, (w, c, n) in best.items()
    ]
    if args.flops:
        counts = {label: flops(fn) for label, fn in runs_on(calib[:1]).items()}
        for row in rows:
            row["ratio_flops"] = counts[row["method"]] / counts["forward"]
    return rows


COLUMNS = [
    Column("method", "method"),
    Column("runs", "runs"),
    Column("wall_s", "best wall s", ".2f"),
    Column("cpu_s", "best CPU s", ".2f"),
    Column("ratio_wall", "÷ forward (wall)", ".2f"),
    Column("ratio_cpu", "÷ forward (CPU)", ".2f"),
]
FLOPS_COLUMN = Column("ratio_flops", "FLOPs ÷ forward", ".2f")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--calibration-size", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--methods", default=None, help="comma-separated labels (default: all)")
    parser.add_argument("--slow", default="pleas", help="label prefixes run only --slow-runs times")
    parser.add_argument("--slow-runs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--flops", action="store_true", help="add FLOPs ÷ forward on the first batch")
    parser.add_argument(
        "--references",
        default=None,
        help="comma-separated labels also timed with MergeModule's treated references",
    )
    parser.add_argument("--out", default=None, help="folder for <name>.md/.json")
    parser.add_argument("--note", default="", help="what else ran on the machine (added to the notes)")
    parser.add_argument("--name", default="whole_merge", help="results file name (e.g. whole_merge_1thread)")
    args = parser.parse_args(argv)
    if min(args.runs, args.calibration_size, args.slow_runs) < 1:
        parser.error("--runs, --calibration-size and --slow-runs must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_description("cpu")  # the load average the runs started under
    rows = run(args)
    columns = [*COLUMNS, FLOPS_COLUMN] if args.flops else COLUMNS
    print(markdown_table(columns, rows))
    if args.out is not None:
        notes = (
            f"ResNet-20×1 test pair (quick_pair), {args.calibration_size} calibration images in memory, "
            f"best of {args.runs} interleaved runs (methods starting with {args.slow!r}: "
            f"{args.slow_runs}). forward = both sources over the calibration batches (no_grad); a "
            "method = the sources' BatchNorm reset where its reset_sources is on (zipit, mudsc rows) + "
            "statistics pass (its requires) + method.merge (match, apply, refit) + post_merge "
            "(repair=True: BatchNorm reset); '+ references': then the equally treated references "
            "MergeModule scores by default (the sources' reset reused, or copies of the sources reset). "
            + (
                "FLOPs ÷ forward: torch's FLOP counter on the first batch (convolutions and matrix "
                "products; solves and the matchers' loops not counted). "
                if args.flops
                else ""
            )
            + "Ratio = method / forward. Load average after the runs: "
            + " / ".join(f"{v:.1f}" for v in os.getloadavg())
            + (f". {args.note}" if args.note else "")
        )
        write_results(
            args.out,
            args.name,
            title="Whole merge vs a plain forward of the sources"
            + (f" ({args.threads} torch thread{'s' * (args.threads > 1)})" if args.threads else ""),
            columns=columns,
            rows=rows,
            command=command_line("benchmarks/whole_merge.py", argv),
            machine=machine,
            notes=notes,
        )
    return rows


if __name__ == "__main__":
    main()
