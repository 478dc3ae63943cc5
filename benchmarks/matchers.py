"""Matcher timings: fast ZipIt! against the literal greedy reference, and Hungarian Permute.

    .venv/bin/python benchmarks/matchers.py --sizes 128 512 1024 2048 --ref-max-n 1024

N = 2 models, correlation of random Gaussian features (2n samples), ZipIt! with the paper's
α = 0.3, β = 0.125 down to m = n. Median wall time of ``--repeats`` runs; the reference also checks
that both implementations made the same fusions. "fast" runs its loop on NumPy views of the CPU
matrix (the default on CPU); "torch loop" is the same loop in torch ops (the path used on GPUs).
Prints a Markdown table.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from zipit_reference import zipit_reference  # noqa: E402

from lightning_merge.match import match_permute  # noqa: E402
from lightning_merge.match.zip import zipit_fusions  # noqa: E402


def random_corr(n: int, num_models: int = 2, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_models * n, 2 * n, generator=gen, dtype=torch.float64)
    corr = torch.corrcoef(x)
    return ((corr + corr.T) / 2).to(device)


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 1024, 2048])
    parser.add_argument("--ref-max-n", type=int, default=1024, help="largest n the reference runs at")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--beta", type=float, default=0.125)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, device {args.device}"
    )
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print(
        "| n | N·n | fast ZipIt! (s) | fast, torch loop (s) | reference (s) | speed-up "
        "| same fusions | Permute (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        corr = random_corr(n, device=args.device)
        zip_fast = functools.partial(zipit_fusions, corr, 2, n, args.alpha, args.beta)
        fast_s, fast = median_time(zip_fast, args.repeats)
        zip_torch = functools.partial(zip_fast, backend="torch")
        torch_s, fast_torch = median_time(zip_torch, args.repeats)
        assert fast_torch == fast
        perm_s, _ = median_time(functools.partial(match_permute, corr, 2), args.repeats)
        if n <= args.ref_max_n:
            zip_ref = functools.partial(zipit_reference, corr.cpu(), 2, n, args.alpha, args.beta)
            ref_s, (ref, _) = median_time(zip_ref, args.repeats)
            ref_txt, speed, same = f"{ref_s:.2f}", f"{ref_s / fast_s:.0f}×", str(ref == fast)
        else:
            ref_txt, speed, same = "skipped", "–", "–"
        print(
            f"| {n} | {2 * n} | {fast_s:.3f} | {torch_s:.3f} | {ref_txt} | {speed} | {same} | {perm_s:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
