"""Time the statistics pass (feature moments) against a plain no-grad forward of the same N models.

    python benchmarks/stats_pass.py --runs 5 --batches 4 --batch-size 256

For each architecture: N=2 randomly initialised sources (timing does not depend on the weights),
the merge graph from ``trace_graph``, and the same in-memory batches: 1×28×28 (Fashion-MNIST-shaped)
for the project's nets, the coverage table's input (3×64×64; ViT-B/16 at 32) for a torchvision name
(``--archs resnet18,efficientnet_b0 --name stats_pass_torchvision``).
"forward" runs every model over every batch under ``torch.no_grad``; "pass" is
``collect_statistics`` over the same batches. Both get one warm-up run; the table reports medians.
With ``--out benchmarks/results`` it also writes stats_pass.md / stats_pass.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_merge.graph import MergeGraph, trace_graph
from lightning_merge.models import VGG11BN, ResNet20
from lightning_merge.models.vit import ViT
from lightning_merge.stats.collect import collect_statistics
from lightning_merge.stats.moments import FeatureMomentsCollector, moments_memory_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import Column, command_line, machine_description, markdown_table, write_results  # noqa: E402

ARCHS: dict[str, Callable[[], nn.Module]] = {
    "resnet20x1": lambda: ResNet20(width=1),
    "resnet20x4": lambda: ResNet20(width=4),
    "vgg11_bn": lambda: VGG11BN(),
    "vit": lambda: ViT(),
}
#: one torchvision architecture per family of the coverage table's CI subset
TORCHVISION = (
    "resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "regnet_x_400mf",
    "densenet121", "vit_b_16", "swin_t",
)  # fmt: skip


def build(arch: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A random-weight model and its input shape (no batch axis)."""
    if arch in ARCHS:
        return ARCHS[arch](), (1, 28, 28)
    from zoo_coverage import build as build_torchvision

    model, size = build_torchvision(arch)
    return model, (3, size, size)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def medians(fns: dict[str, Callable[[], object]], runs: int, device: torch.device) -> dict[str, tuple]:
    """Median (wall, CPU) seconds per function; runs interleave so all see the same machine load."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return {k: tuple(statistics.median(t[i] for t in v) for i in (0, 1)) for k, v in times.items()}


def addmm_inplace_flops(_c: object, a: tuple[int, ...], b: tuple[int, ...], *_: object, **__: object) -> int:
    """``addmm_`` (the float64 moments' accumulation), which torch's FLOP counter has no formula for."""
    return 2 * a[0] * a[1] * b[1]


def flops(fn: Callable[[], object]) -> int:
    """FLOPs torch's counter sees in one call of ``fn`` (``addmm_`` given its formula)."""
    mapping = {torch.ops.aten.addmm_: addmm_inplace_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def flop_ratio(models: list[nn.Module], graph: MergeGraph, batch: torch.Tensor) -> float:
    """FLOPs of the statistics pass over one batch (the forward and the moments' products, float64
    included) over those of the plain forward: the floor under the time ratio, whatever the kernels."""
    with torch.no_grad():
        counts = [
            flops(lambda: [m(batch) for m in models]),
            flops(
                lambda: collect_statistics(
                    models, graph, [batch], collectors=[FeatureMomentsCollector(graph)], progress=False
                )
            ),
        ]
    return counts[1] / counts[0]


def bench(arch: str, args: argparse.Namespace, device: torch.device) -> dict:
    """One row of raw numbers (seconds, ratios) for ``arch``."""
    torch.manual_seed(0)
    built = [build(arch) for _ in range(2)]
    models, shape = [m.to(device).eval() for m, _ in built], built[0][1]
    graph = trace_graph(models[0], torch.randn(2, *shape, device=device))
    batches = [torch.randn(args.batch_size, *shape, device=device) for _ in range(args.batches)]

    def forward() -> None:
        with torch.no_grad():
            for x in batches:
                for m in models:
                    m(x)

    def stats_pass(batch_dtype: torch.dtype) -> Callable[[], object]:
        def run() -> object:
            collector = FeatureMomentsCollector(graph, batch_dtype=batch_dtype)
            return collect_statistics(models, graph, batches, collectors=[collector], progress=False)

        return run

    variants = {"forward": forward, "f64": stats_pass(torch.float64)}
    if args.f32_batch:
        variants["f32batch"] = stats_pass(torch.float32)
    t = medians(variants, args.runs, device)
    row: dict = {
        "arch": arch,
        "input": "×".join(map(str, shape)),
        "device": str(device),
        "taps": len(graph.taps),
        "state_mib": moments_memory_bytes(graph, 2) / 2**20,
        "flop_ratio": flop_ratio(models, graph, batches[0]),
        "forward_wall_s": t["forward"][0],
        "forward_cpu_s": t["forward"][1],
    }
    for name in variants:
        if name != "forward":
            row[f"pass_{name}_wall_s"], row[f"pass_{name}_cpu_s"] = t[name]
            row[f"ratio_{name}_wall"] = t[name][0] / t["forward"][0]
            row[f"ratio_{name}_cpu"] = t[name][1] / t["forward"][1]
    return row


def columns(f32_batch: bool) -> list[Column]:
    cols = [
        Column("arch", "arch"),
        Column("input", "input"),
        Column("device", "device"),
        Column("taps", "taps"),
        Column("state_mib", "state MiB", ".1f"),
        Column("flop_ratio", "FLOPs pass / forward", ".2f"),
        Column("forward_wall_s", "forward s (wall)", ".2f"),
        Column("forward_cpu_s", "forward s (cpu)", ".2f"),
    ]
    for name in ["f64"] + (["f32batch"] if f32_batch else []):
        cols += [
            Column(f"pass_{name}_wall_s", f"pass {name} s (wall)", ".2f"),
            Column(f"pass_{name}_cpu_s", f"pass {name} s (cpu)", ".2f"),
            Column(f"ratio_{name}_wall", f"ratio {name} (wall)", ".2f"),
            Column(f"ratio_{name}_cpu", f"ratio {name} (cpu)", ".2f"),
        ]
    return cols


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--archs",
        default="resnet20x1,resnet20x4,vgg11_bn",
        help="comma-separated, of "
        + ",".join(ARCHS)
        + " or torchvision names ("
        + ",".join(TORCHVISION)
        + ")",
    )
    parser.add_argument("--name", default="stats_pass", help="output file stem under --out")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--f32-batch", action="store_true", help="also time float32 per-batch products")
    parser.add_argument("--out", default=None, help="folder for stats_pass.md/.json (default: stdout only)")
    args = parser.parse_args(argv)
    known = set(ARCHS) | set(torchvision.models.list_models(module=torchvision.models))
    unknown = [a for a in args.archs.split(",") if a not in known]
    if unknown:
        parser.error(f"unknown --archs {unknown}; choose from {list(ARCHS)} or a torchvision classifier")
    if min(args.runs, args.batches, args.batch_size) < 1:
        parser.error("--runs, --batches and --batch-size must be positive")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    machine = machine_description(device)  # before the runs: the load average they started under
    rows = [bench(arch, args, device) for arch in args.archs.split(",")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    setup = f"N=2 models, {args.batches} batches of {args.batch_size} images (shape: input column)"
    setup += f", median of {args.runs} runs"
    print(setup)
    cols = columns(args.f32_batch)
    print(markdown_table(cols, rows))
    if args.out is not None:
        notes = (
            f"{setup}, randomly initialised sources (the time does not depend on the weights). "
            "forward: every model over every batch under torch.no_grad; pass: collect_statistics with "
            "the feature-moments collector over the same batches (float64 accumulators; f32batch: "
            "float32 per-batch products). One warm-up each, runs interleaved; wall and process CPU "
            "seconds; ratio = pass / forward."
        )
        paths = write_results(
            args.out,
            args.name,
            title="Statistics pass vs a plain forward",
            columns=cols,
            rows=rows,
            command=command_line("benchmarks/stats_pass.py", argv),
            machine=machine,
            notes=notes,
        )
        print("wrote " + ", ".join(map(str, paths)))
    return rows


if __name__ == "__main__":
    main()
