"""Time a few epochs of one source trained to a plateau (the converged benchmark sources' settings).

    .venv/bin/python benchmarks/source_epochs.py --arch resnet20 --width 1 --epochs 3

Trains task [0..4] with seed 0 under ``train_source(plateau=...)`` into a throw-away cache folder (the
rule's ``min_epochs`` is set to ``--epochs`` so it stops there) and writes
``source_epochs_<arch>x<w>.{json,md}``: seconds per epoch (validation included), the validation curve,
the command and the machine (its load average), and the process's CPU seconds per epoch, which do not
depend on how many other jobs share the CPU. It estimates what training every benchmark source to a
plateau costs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import Column, command_line, machine_description, write_results  # noqa: E402

from lightning_merge.models import PlateauRule, source_record, train_source  # noqa: E402
from lightning_merge.models.training import cache_path, source_key  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--width", type=float, default=1)
    p.add_argument("--epochs", type=int, default=3, help="epochs to time (>= 2)")
    p.add_argument("--max-epochs", type=int, default=30, help="the schedule's length (one-cycle)")
    p.add_argument("--precision", default=None, help="Lightning precision (None: float32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    p.add_argument("--out-dir", default="benchmarks/results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    width = int(args.width) if float(args.width).is_integer() else args.width
    rule = PlateauRule(min_epochs=args.epochs, min_gain=100.0)  # stops after exactly --epochs
    kwargs = {"width": width, "max_epochs": args.max_epochs, "precision": args.precision, "plateau": rule}
    kwargs |= {"head": "embedding", "lr": 0.1}
    with tempfile.TemporaryDirectory() as cache:
        start, cpu = time.perf_counter(), time.process_time()
        train_source(args.arch, [0, 1, 2, 3, 4], 0, cache_dir=cache, **kwargs)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        record = source_record(cache_path(cache, source_key(args.arch, [0, 1, 2, 3, 4], 0, **kwargs)))
    row = {
        "arch": f"{args.arch}×{args.width:g}",
        "precision": args.precision or "32-true",
        "threads": args.threads,
        "epochs": record["epochs"],
        "epoch_seconds": record["epoch_seconds"],
        # CPU time is what a less loaded machine would take in wall time (the CPU is shared)
        "epoch_cpu_seconds": cpu / record["epochs"],
        "wall_seconds": wall,
        "val_acc_curve": " ".join(f"{100 * a:.2f}" for a in record["val_acc_curve"]),
    }
    cols = [Column(k, k, ".1f" if "seconds" in k else "") for k in row]
    write_results(
        args.out_dir,
        f"source_epochs_{args.arch}x{args.width:g}",
        title=f"Epoch time of one {row['arch']} source (task [0..4], ~27.5k train images, val per epoch)",
        columns=cols,
        rows=[row],
        command=command_line("benchmarks/source_epochs.py", argv),
        machine=machine_description("cpu"),
        notes=f"Schedule: one-cycle over {args.max_epochs} epochs; val accuracy in % per epoch.",
        extra={"record": record},
    )
    print(row)
    return row


if __name__ == "__main__":
    main()
