"""Matcher timings: fast ZipIt! against the literal greedy reference, and Hungarian Permute.

    .venv/bin/python benchmarks/matchers.py --sizes 128 512 1024 2048 --ref-max-n 1024
    .venv/bin/python benchmarks/matchers.py --sizes 2048 4096 --kinds structured random --best-of

N = 2 models, correlation of random Gaussian features (2n samples) or of structured ones (permuted
noisy low-rank copies, ``--kinds structured``), ZipIt! with the paper's α = 0.3, β = 0.125 down to
m = n. Median (``--best-of``: fastest) wall and process CPU time of ``--repeats`` runs, and the
1-minute load average when the row started (the machine may be shared); the reference also checks
that both implementations made the same fusions. "fast" is the CPU default (the column-write-free
loop compiled with Numba; its one-time compile or cache load happens in a warm-up call before any
timing and is reported as ``first_call_s``); "torch loop" is the in-place loop in torch ops (the path
used on GPUs); both must agree. Prints a Markdown table; with ``--out benchmarks/results`` also
writes matchers.md / matchers.json.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numba
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_io import Column, command_line, machine_description, markdown_table, write_results  # noqa: E402
from zipit_reference import zipit_reference  # noqa: E402

from lightning_merge.match import match_permute  # noqa: E402
from lightning_merge.match.zip import zipit_fusions  # noqa: E402


def random_corr(n: int, num_models: int = 2, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_models * n, 2 * n, generator=gen, dtype=torch.float64)
    corr = torch.corrcoef(x)
    return ((corr + corr.T) / 2).to(device)


def structured_corr(n: int, num_models: int = 2, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """Permuted noisy copies of rank-n/16 features per model, like two trained nets' units: many
    rows share a best partner, so the greedy loop rescans far more rows than on random features."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, max(n // 16, 4), generator=gen, dtype=torch.float64)
    blocks = [base[torch.randperm(n, generator=gen)] for _ in range(num_models)]
    load = torch.cat([b + 0.7 * torch.randn(b.shape, generator=gen, dtype=torch.float64) for b in blocks])
    cov = load @ load.T + torch.diag(torch.rand(num_models * n, generator=gen, dtype=torch.float64))
    std = cov.diagonal().sqrt()
    corr = cov / torch.outer(std, std)
    return ((corr + corr.T) / 2).to(device)


def median_time(fn, repeats: int) -> tuple[float, float, object]:
    """(wall, process CPU) seconds of ``repeats`` calls — medians, or with --best-of the fastest of
    each — and the last output."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    pick = min if BEST_OF else statistics.median
    return pick(walls), pick(cpus), out


BEST_OF = False  # --best-of: report the fastest run (a shared, loaded machine) instead of the median


COLUMNS = [
    Column("kind", "matrix"),
    Column("n", "n"),
    Column("dim", "N·n"),
    Column("load", "load avg", ".1f"),
    Column("fast_s", "fast ZipIt! (s)", ".3f"),
    Column("fast_cpu_s", "fast, CPU (s)", ".3f"),
    Column("torch_loop_s", "fast, torch loop (s)", ".3f"),
    Column("torch_loop_cpu_s", "torch loop, CPU (s)", ".3f"),
    Column("reference_s", "reference (s)", ".2f"),
    Column("speedup", "speed-up (×)", ".0f"),
    Column("same_fusions", "same fusions"),
    Column("permute_s", "Permute (s)", ".3f"),
]


def bench_size(n: int, args: argparse.Namespace, kind: str = "random") -> dict:
    """One table row (raw seconds) for features of size n per model."""
    corr = (structured_corr if kind == "structured" else random_corr)(n, device=args.device)
    load = os.getloadavg()[0]
    zip_fast = functools.partial(zipit_fusions, corr, 2, n, args.alpha, args.beta)
    fast_s, fast_cpu, fast = median_time(zip_fast, args.repeats)
    torch_s, torch_cpu, fast_torch = median_time(functools.partial(zip_fast, backend="torch"), args.repeats)
    if fast_torch != fast:
        raise RuntimeError(f"n={n}: the NumPy and torch loops made different fusions")
    perm_s, _, _ = median_time(functools.partial(match_permute, corr, 2), args.repeats)
    row = {"kind": kind, "n": n, "dim": 2 * n, "load": load, "fast_s": fast_s, "fast_cpu_s": fast_cpu}
    row |= {"torch_loop_s": torch_s, "torch_loop_cpu_s": torch_cpu, "permute_s": perm_s}
    row |= {"reference_s": None, "speedup": None, "same_fusions": None}
    if n <= args.ref_max_n:
        zip_ref = functools.partial(zipit_reference, corr.cpu(), 2, n, args.alpha, args.beta)
        ref_s, _, (ref, _) = median_time(zip_ref, args.repeats)
        row |= {"reference_s": ref_s, "speedup": ref_s / fast_s, "same_fusions": ref == fast}
    return row


def warm_up(args: argparse.Namespace) -> float:
    """Wall seconds of the first CPU ZipIt! call in this process: Numba compiles the loop (or loads it
    from its cache) here, not inside a timed run."""
    start = time.perf_counter()
    zipit_fusions(random_corr(8), 2, 8, args.alpha, args.beta)
    return time.perf_counter() - start


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 1024, 2048])
    parser.add_argument("--ref-max-n", type=int, default=1024, help="largest n the reference runs at")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=["random"], choices=["random", "structured"])
    parser.add_argument("--best-of", action="store_true", help="report the fastest run, not the median")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--beta", type=float, default=0.125)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--name", default="matchers", help="results file stem under --out")
    parser.add_argument("--out", default=None, help="folder for matchers.md/.json (default: stdout only)")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.sizes) or args.repeats < 1:
        parser.error(f"sizes and repeats must be positive, got sizes={args.sizes} repeats={args.repeats}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    global BEST_OF
    BEST_OF = args.best_of
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, device {args.device}"
    )
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    machine = machine_description(args.device)  # before the runs: the load average they started under
    first_call_s = warm_up(args)
    print(f"first call of the compiled loop (compile or cache load): {first_call_s:.2f} s")
    print(markdown_table(COLUMNS, []))
    rows = []
    for kind in args.kinds:
        for n in args.sizes:
            rows.append(bench_size(n, args, kind))
            print(markdown_table(COLUMNS, rows[-1:]).splitlines()[-1], flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.out is not None:
        pick = "best" if args.best_of else "median"
        notes = (
            'N = 2 models; matrix "random": correlation of random Gaussian features (2n samples), '
            '"structured": permuted noisy copies of rank-n/16 features per model (structured_corr). '
            f"ZipIt! α = {args.alpha}, β = {args.beta} down to m = n, on {args.device}; {pick} wall and "
            f"{pick} process CPU seconds of {args.repeats} runs (each size's runs interleaved only with "
            'its own other columns); "load avg": the 1-minute load average when the row started. '
            f'"fast" is the CPU default (the column-write-free loop compiled with Numba {numba.__version__}; '
            f"its first call in the process, compile or cache load, took {first_call_s:.2f} s and is not "
            "timed; a first large call also pays for its scratch pages, see matchers_profile.md), "
            '"torch loop" the in-place loop in torch ops (the GPU path), which must make the same '
            "fusions; the reference is the literal greedy algorithm (tests/zipit_reference.py), run up "
            f'to n = {args.ref_max_n}; "same fusions" compares its fusions with the fast one\'s.'
        )
        paths = write_results(
            args.out,
            args.name,
            title="Matcher times: fast ZipIt! vs the literal reference, and Permute",
            columns=COLUMNS,
            rows=rows,
            command=command_line("benchmarks/matchers.py", argv),
            machine=machine,
            notes=notes,
            extra={"first_call_s": first_call_s},
        )
        print("wrote " + ", ".join(map(str, paths)))
    return rows


if __name__ == "__main__":
    main()
