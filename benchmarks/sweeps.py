"""Joint accuracy against PLeaS' merged width and against ZipIt!'s partial-zip depth, on one seed group.

    .venv/bin/python benchmarks/sweeps.py --arch resnet20 --width 1 --seeds 0:1

Width sweep: PLeaS (and ZipIt! for comparison) at merged widths m = w·n, w in ``--widths`` (1 is a
full merge to the source size, N a merge that fuses nothing). Depth sweep: ZipIt! merged up to a
cut point, every source finishing on its own tail; ``--depths`` are depth fractions in [0, 1], each
mapped to its nearest cut point (``lightning_merge.apply.partial.resolve_cut``: depth = the fraction
of the model's merge points in forward order merged before the cut, so 1.0 is the last cut, where
only the heads stay apart); without ``--depths`` every cut point is used. The full zip (no cut) is
the depth plot's dashed line. Rows run through ``merge_table.run_group`` (same rows, statistics files
and resumability as the table) into ``sweep_<arch>x<w>_split<N>.{csv,json,md}`` with two PNGs.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import merge_table as mt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_merge.apply.partial import resolve_cut  # noqa: E402
from lightning_merge.graph import trace_graph  # noqa: E402
from lightning_merge.graph.spec import CutPoint  # noqa: E402
from lightning_merge.methods import PLeaSMerge, ZipItMerge  # noqa: E402
from lightning_merge.models import SourceClassifier  # noqa: E402

Point = dict[str, Any]  # {"sweep": "width" | "depth", "series": ..., "x": float | None, "cut": str | None}


def depth_cuts(
    model: nn.Module, image_shape: Sequence[int], depths: Sequence[float] | None
) -> list[CutPoint]:
    """The distinct cut points nearest to ``depths`` (all of the model's when None), shallow first."""
    network = model.model if isinstance(model, SourceClassifier) else model  # what MergeModule traces
    graph = trace_graph(network, torch.zeros(2, *image_shape))
    cuts = graph.cut_points if depths is None else [resolve_cut(graph, d) for d in depths]
    unique = {c.node: c for c in cuts}
    return sorted(unique.values(), key=lambda c: c.depth)


def sweep_rows(
    num_models: int, widths: Sequence[float], cuts: Sequence[CutPoint]
) -> tuple[list[mt.MethodRow], dict[str, Point]]:
    """The sweep's method rows and, per row label, where it sits on its plot."""
    zip_ = mt.zip_settings(num_models)
    rows: list[mt.MethodRow] = []
    points: dict[str, Point] = {}
    for w in widths:
        for series, name, cls, kwargs in (
            ("PLeaS", "pleas", PLeaSMerge, {"ridge": 1e-4, "refit": True}),
            ("ZipIt!", "zipit", ZipItMerge, zip_),
        ):
            label = f"{name} w={w:g}"
            rows.append((label, mt._factory(cls, width=w, **kwargs)))
            points[label] = {"sweep": "width", "series": series, "x": float(w), "cut": None}
    for cut in cuts:
        label = f"zipit partial@{cut.node}"
        rows.append((label, mt._factory(ZipItMerge, **zip_, stop_at=cut.node)))
        points[label] = {"sweep": "depth", "series": "ZipIt! partial", "x": cut.depth, "cut": cut.node}
    if cuts:
        rows.append(("zipit", mt._factory(ZipItMerge, **zip_)))
        points["zipit"] = {"sweep": "depth", "series": "ZipIt! full", "x": None, "cut": None}
    return rows, points


def _reference_lines(ax: plt.Axes, rows: Sequence[mt.MetricRow], num_tasks: int) -> None:
    styles = {"ensemble": ("black", "-")}
    for label in mt.reference_labels(num_tasks):
        value = mt.mean_joint(rows, label)
        if value == value:  # not NaN
            color, style = styles.get(label, ("grey", ":"))
            ax.axhline(value, color=color, linestyle=style, linewidth=1, label=label)


def plot_sweep(
    rows: Sequence[mt.MetricRow], points: dict[str, Point], sweep: str, num_tasks: int, title: str, path: Path
) -> bool:
    """One PNG: joint accuracy per series against x, relative FLOPs on the right axis; False if empty."""
    ok = [
        r
        for r in rows
        if r["method"] in points and not r.get("error") and points[r["method"]]["sweep"] == sweep
    ]
    if not ok:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    flops = ax.twinx()
    for series in dict.fromkeys(points[r["method"]]["series"] for r in ok):
        sel = [r for r in ok if points[r["method"]]["series"] == series]
        line = [(points[r["method"]]["x"], r) for r in sel if points[r["method"]]["x"] is not None]
        if not line:  # the full zip: no x, a dashed line across
            ax.axhline(sel[0]["joint_acc"], color="tab:red", linestyle="--", linewidth=1, label=series)
            continue
        line.sort(key=lambda p: p[0])
        xs = [x for x, _ in line]
        (drawn,) = ax.plot(xs, [r["joint_acc"] for _, r in line], marker="o", label=series)
        flops.plot(xs, [r["rel_flops"] for _, r in line], color=drawn.get_color(), linestyle=":", marker=".")
    _reference_lines(ax, rows, num_tasks)
    ax.set_xlabel("merged width m / n" if sweep == "width" else "cut depth (fraction of merge points merged)")
    ax.set_ylabel("joint accuracy (%)")
    flops.set_ylabel("relative FLOPs (dotted)")
    ax.set_title(title)
    # below the axes, so it covers no line
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=5, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet20", help="source architecture (registry name)")
    p.add_argument("--width", type=float, default=1, help="source width multiplier")
    p.add_argument("--split", type=int, choices=sorted(mt.SPLITS), default=2, help="number of tasks / models")
    p.add_argument("--seeds", type=mt.parse_seeds, default=None, help="one seed group, e.g. 0:1")
    p.add_argument("--widths", type=float, nargs="*", default=[1.0, 1.25, 1.5, 1.75, 2.0], help="m / n")
    p.add_argument("--depths", type=float, nargs="*", default=None, help="cut depths (default: every cut)")
    p.add_argument("--no-depth", action="store_true", help="skip the depth sweep")
    p.add_argument("--fresh", action="store_true", help="ignore rows already in the output JSON")
    p.add_argument("--cache-dir", default=mt.DEFAULT_CACHE_DIR, help="source checkpoints (trained if absent)")
    p.add_argument("--stats-dir", default="artifacts/merge_table/stats", help="statistics files")
    p.add_argument("--out-dir", default="benchmarks/results", help="where the outputs go")
    p.add_argument("--root", default=mt.DEFAULT_ROOT, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--calibration-size", type=int, default=2000, help="images in the statistics pass")
    args = p.parse_args(argv)
    args.seeds = args.seeds or tuple(range(args.split))
    if len(args.seeds) != args.split:
        p.error(
            f"--split {args.split} needs {args.split} seeds (one per task), got {mt.seeds_label(args.seeds)}"
        )
    bad = [w for w in args.widths if not 1 <= w <= args.split]
    if bad:
        p.error(f"--widths must lie in [1, {args.split}] (merged width between n and N·n), got {bad}")
    bad = [d for d in args.depths or () if not 0 <= d <= 1]
    if bad:
        p.error(f"--depths are fractions in [0, 1], got {bad}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.getLogger("lightning_merge").setLevel(logging.WARNING)
    data = mt.datamodule_for(args)
    tasks = mt.SPLITS[args.split]
    sources = mt.group_sources(args.seeds, tasks, args.arch, args.width, args.cache_dir, data.root)
    cuts = [] if args.no_depth else depth_cuts(sources[0], data.image_shape, args.depths)
    rows, points = sweep_rows(args.split, args.widths, cuts)
    stats_dir, out_dir = Path(args.stats_dir), Path(args.out_dir)
    stats_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"{args.arch}x{args.width:g}_split{args.split}"
    meta = {
        "command": mt.command_line("benchmarks/sweeps.py", argv),
        "machine": mt.machine_description(),
        "arch": args.arch,
        "width": args.width,
        "split": args.split,
        "tasks": [list(t) for t in tasks],
        "zip": mt.zip_settings(args.split),
        "points": points,
    }
    table = out_dir / f"{mt.table_stem(args.arch, args.width, args.split)}.json"
    store = mt.ResultStore(out_dir / f"sweep_{name}", meta, fresh=args.fresh, borrow=[table])
    order = mt.reference_labels(args.split) + [label for label, _ in rows]
    title = f"Sweeps: {args.arch}×{args.width:g}, {args.split} tasks, seeds {mt.seeds_label(args.seeds)}"
    start = time.perf_counter()
    mt.run_group(
        args.seeds,
        rows,
        data,
        lambda: sources,
        lambda m: mt.stats_file(
            stats_dir, mt.table_stem(args.arch, args.width, args.split), args.seeds, m, args.calibration_size
        ),
        store,
        lambda: store.save(order, title, args.split),
    )
    store.save(order, title, args.split)
    group = [r for r in store.rows if r["seeds"] == mt.seeds_label(args.seeds)]
    pngs = {}
    for sweep in ("width", "depth"):
        path = out_dir / f"sweep_{'pleas_width' if sweep == 'width' else 'zip_depth'}_{name}.png"
        label = "merged width" if sweep == "width" else "partial-zip depth"
        if plot_sweep(
            group, points, sweep, args.split, f"{args.arch}×{args.width:g}: joint accuracy vs {label}", path
        ):
            pngs[sweep] = str(path)
    print(
        f"wrote {out_dir / f'sweep_{name}'}.{{csv,json,md}} and {list(pngs.values())} in "
        f"{time.perf_counter() - start:.0f} s"
    )
    return {"rows": group, "points": points, "pngs": pngs}


if __name__ == "__main__":
    main()
