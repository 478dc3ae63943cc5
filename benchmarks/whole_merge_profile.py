"""Where a whole merge's time goes: cProfile of benchmarks/whole_merge.py's ``whole_merge`` per method.

    python benchmarks/whole_merge_profile.py --out benchmarks/results

Same sources, images and stages as whole_merge.py (the ResNet-20×1 test pair, calibration images in
memory; statistics pass + method.merge + post-merge BatchNorm reset, and the sources' reset where the
method asks for it). Per method: one warm-up merge, one timed merge, then one merge under cProfile;
the table lists the library's functions with the most cumulative time and torch's built-ins with the
most own time, so the split between statistics, matching, refit and reset can be read off.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import Column, command_line, machine_description, markdown_table, write_results  # noqa: E402
from merge_table import method_rows  # noqa: E402
from perf import networks, perf_datamodule  # noqa: E402
from whole_merge import plain_forward, prepared, timed, whole_merge  # noqa: E402

from lightning_merge.models.training import quick_pair  # noqa: E402

#: torch's C built-ins (where the arithmetic happens), listed by their own time beside the library's
#: functions (listed by cumulative time)
BUILTINS = ("<built-in method torch.", "<method '")


def profile_rows(label: str, fn: Any, top: int) -> list[dict[str, Any]]:
    """The ``top`` entries by cumulative time of one profiled call of ``fn``."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    ours, builtins = [], []
    for (path, line, name), (_, calls, own, cum, _) in stats.items():
        where = f"{path}:{line}({name})" if path != "~" else name
        row = {"method": label, "calls": calls, "own_s": own, "cum_s": cum}
        if "lightning_merge/" in where:
            ours.append({**row, "function": where.split("lightning_merge/", 1)[-1]})
        elif where.startswith(BUILTINS):
            builtins.append({**row, "function": where})
    ours.sort(key=lambda r: -r["cum_s"])
    builtins.sort(key=lambda r: -r["own_s"])
    return ours[:top] + builtins[: max(1, top // 3)]


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    sources = quick_pair("resnet20", width=1)
    models = [m.eval().requires_grad_(False) for m in networks(sources)]
    dm = perf_datamodule(sources, args.calibration_size)
    calib = [(x, y) for x, y, *_ in dm.calibration_dataloader()]
    prep = prepared(models, calib[0][0])
    makers = dict(method_rows(pleas_widths=(1.5,)))
    plain_forward(models, calib)  # warm-up
    notes, rows = [], []
    for label in args.methods.split(","):
        make = makers[label]
        whole_merge(make(), prep, calib)  # warm-up (compiles, caches)
        forward = timed(lambda: plain_forward(models, calib))[0]
        merge = timed(lambda make=make: whole_merge(make(), prep, calib))[0]
        notes.append(
            f"{label}: forward {forward:.2f} s, merge {merge:.2f} s ({merge / forward:.2f}×) unprofiled"
        )
        rows += profile_rows(label, lambda make=make: whole_merge(make(), prep, calib), args.top)
    return rows, notes


COLUMNS = [
    Column("method", "method"),
    Column("function", "function"),
    Column("calls", "calls"),
    Column("own_s", "own s", ".3f"),
    Column("cum_s", "cumulative s", ".3f"),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--methods", default="zipit no source reset,pleas w=1.5")
    parser.add_argument("--calibration-size", type=int, default=2000)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_description("cpu")
    rows, notes = run(args)
    print("\n".join(notes))
    print(markdown_table(COLUMNS, rows))
    if args.out is not None:
        write_results(
            args.out,
            "whole_merge_profile",
            title="Where a whole merge's time goes (cProfile)",
            columns=COLUMNS,
            rows=rows,
            command=command_line("benchmarks/whole_merge_profile.py", argv),
            machine=machine,
            notes=(
                f"ResNet-20×1 test pair, {args.calibration_size} calibration images; per method one warm-up, "
                "one unprofiled timing beside a plain forward, then one merge under cProfile (the table: "
                f"the library's {args.top} functions with the most cumulative time, then torch's "
                f"{max(1, args.top // 3)} built-ins with the most own time). "
                + "; ".join(notes)
                + (f". {args.note}" if args.note else "")
            ),
        )


if __name__ == "__main__":
    main()
