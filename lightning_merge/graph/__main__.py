"""Print the merge graph of an architecture: ``python -m lightning_merge.graph resnet20 --width 2``.

Project archs (``mlp``, ``vgg11_bn``, ``resnet20``) come from ``lightning_merge.models.build_model``;
torchvision ones (``resnet18``, ``resnet50``, ``vgg11_bn_tv``, ``vit_b_16``) use random weights.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from lightning_merge.apply.twin import check_equivalence

from .manual import save_graph
from .spec import MergeGraph
from .trace import trace_graph

PROJECT = ("mlp", "vgg11_bn", "resnet20")
TORCHVISION = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "vgg11_bn_tv": "vgg11_bn",
    "vit_b_16": "vit_b_16",
}


def build(arch: str, width: float, head: str) -> tuple[nn.Module, torch.Tensor]:
    """The model (random weights, never downloaded) and a small example input for it."""
    if arch in PROJECT:
        from lightning_merge.models import build_model

        return build_model(arch, width=width, head=head), torch.randn(2, 1, 28, 28)
    if arch in TORCHVISION:
        import torchvision

        model = getattr(torchvision.models, TORCHVISION[arch])(weights=None)
        size = 224 if arch == "vit_b_16" else 64
        return model, torch.randn(1 if arch == "vit_b_16" else 2, 3, size, size)
    raise SystemExit(f"unknown architecture {arch!r}; choose from {list(PROJECT) + list(TORCHVISION)}")


def render(graph: MergeGraph, console: Console) -> None:
    spaces = Table(title=f"{len(graph.spaces)} merge points (forward order)")
    for col in ("#", "space", "size", "group", "members (param:axis:role)"):
        spaces.add_column(col, overflow="fold")
    for i, s in enumerate(graph.spaces):
        members = "\n".join(f"{m.param}:{m.axis}:{m.role}" + _extra(m) for m in s.members)
        spaces.add_row(str(i), s.name, str(s.size), str(s.group_size), members)
    console.print(spaces)
    taps = Table(title=f"{len(graph.taps)} taps (module input observed)")
    for col in ("module", "kind", "channel dim", "inner", "segments (space@offset+size)"):
        taps.add_column(col)
    for t in graph.taps:
        segs = ", ".join(f"{g.space}@{g.offset}+{g.size}" for g in t.segments)
        taps.add_row(t.module, t.kind, str(t.channel_dim), str(t.inner), segs)
    console.print(taps)
    cuts = Table(title=f"{len(graph.cut_points)} cut points (partial zipping may stop here)")
    for col in ("fx node", "space", "channel dim", "depth"):
        cuts.add_column(col)
    for c in graph.cut_points:
        cuts.add_row(c.node, c.space, str(c.channel_dim), f"{c.depth:.2f}")
    console.print(cuts)


def _extra(m: object) -> str:
    parts = [
        f"{k}={getattr(m, k)}" for k, d in (("offset", 0), ("outer", 1), ("inner", 1)) if getattr(m, k) != d
    ]
    return f" ({', '.join(parts)})" if parts else ""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lightning_merge.graph", description=__doc__)
    p.add_argument("arch", help=f"one of {list(PROJECT) + list(TORCHVISION)}")
    p.add_argument("--width", type=float, default=1, help="width multiplier (project archs)")
    p.add_argument("--head", default="embedding", choices=["embedding", "linear"], help="project head kind")
    p.add_argument("--check", action="store_true", help="also run the float64 equivalence check")
    p.add_argument("--save", help="write the graph as JSON to this path")
    args = p.parse_args(argv)
    model, x = build(args.arch, args.width, args.head)
    start = time.perf_counter()
    graph = trace_graph(model, x)
    console = Console()
    render(graph, console)
    console.print(f"traced in {time.perf_counter() - start:.2f}s; digest {graph.digest()}")
    if args.check:
        console.print(f"equivalence: max|Δ|/max|out| = {check_equivalence(model, graph, x):.2e}")
    if args.save:
        save_graph(graph, args.save)


if __name__ == "__main__":
    main()
