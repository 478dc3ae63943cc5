"""The cost/quality frontier of a table family: joint accuracy against relative FLOPs for every row.

``benchmarks/report.py`` draws one PNG per family of merge tables (``frontier_<family>.png``, one panel
per table), from the tables' JSON alone: each method at its mean joint accuracy over the seed groups
(bars: std) and its largest relative FLOPs, the sources and both ensembles beside them, the best merge
reachable at each cost as a step line, and the equally treated ensemble as a dashed level.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import merge_table as mt  # noqa: E402


@dataclass(frozen=True)
class Point:
    """One method of one table: mean joint accuracy (std over seed groups) at its relative FLOPs."""

    label: str
    flops: float
    joint: float
    std: float
    kind: str  # "merge", "source", "ensemble", "treated ensemble", "treated source"


def kind_of(label: str, num_tasks: int) -> str:
    plain = mt.untreated_labels(num_tasks)
    treated = label.endswith(mt.RESET)
    base = label.removesuffix(mt.RESET)
    if base not in plain:
        return "merge"
    what = "ensemble" if base == "ensemble" else "source"
    return f"treated {what}" if treated else what


def points(rows: Sequence[dict[str, Any]], num_tasks: int, scoring: str = mt.HEADLINE_SCORING) -> list[Point]:
    """Every method with a successful row on every seed group, under ``scoring``."""
    key = f"{mt.SCORING_TAGS[scoring]}joint_acc"
    groups = list(dict.fromkeys(r["seeds"] for r in rows))
    out = []
    for label in dict.fromkeys(r["method"] for r in rows):
        ok = {
            r["seeds"]: r
            for r in rows
            if r["method"] == label and not r.get("error") and r.get(key) is not None
        }
        if not groups or any(g not in ok for g in groups):
            continue
        joints = [ok[g][key] for g in groups]
        std = statistics.stdev(joints) if len(joints) > 1 else 0.0
        flops = max(ok[g]["rel_flops"] for g in groups)
        out.append(Point(label, flops, statistics.fmean(joints), std, kind_of(label, num_tasks)))
    return out


def frontier(merges: Sequence[Point]) -> list[tuple[float, float]]:
    """The best joint accuracy reachable at each cost: (FLOPs, joint) corners of a rising step line."""
    best, corners = -math.inf, []
    for p in sorted(merges, key=lambda p: (p.flops, -p.joint)):
        if p.joint > best:
            best = p.joint
            corners.append((p.flops, p.joint))
    return corners


STYLE = {
    "merge": {"marker": "o", "color": "tab:blue"},
    "source": {"marker": "s", "color": "0.55"},
    "treated source": {"marker": "s", "color": "0.3"},
    "ensemble": {"marker": "D", "color": "tab:orange", "fillstyle": "none"},
    "treated ensemble": {"marker": "D", "color": "tab:red"},
}


def draw_panel(ax: Any, title: str, pts: Sequence[Point], rule: str) -> None:
    for p in pts:
        ax.errorbar(p.flops, p.joint, yerr=p.std, linestyle="none", capsize=2, markersize=6, **STYLE[p.kind])
        if p.kind == "merge" or "ensemble" in p.kind:
            ax.annotate(p.label, (p.flops, p.joint), textcoords="offset points", xytext=(4, 3), fontsize=6)
    corners = frontier([p for p in pts if p.kind == "merge"])
    if corners:
        xs, ys = zip(*corners, strict=True)
        ax.step(xs, ys, where="post", color="tab:blue", alpha=0.5, label="best merge at ≤ this cost")
    treated = [p for p in pts if p.kind == "treated ensemble"]
    if treated:
        ax.axhline(treated[0].joint, color="tab:red", linestyle="--", linewidth=0.8, label="treated ensemble")
    for kind in STYLE:  # one legend entry per kind present
        if any(p.kind == kind for p in pts):
            ax.plot([], [], linestyle="none", label=kind, **STYLE[kind])
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("FLOPs relative to one source (nonzero weights)")
    ax.set_ylabel(f"joint accuracy % ({mt.RULE_NAMES[rule]})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")


def plot_family(tables: Sequence[tuple[str, dict[str, Any]]], path: Path) -> Path | None:
    """One panel per ``(title, table JSON)`` with any complete row; None (nothing written) if none has."""
    panels = []
    for title, data in tables:
        rule = data.get("headline_scoring", mt.HEADLINE_SCORING)
        pts = points(data["rows"], len(data["tasks"]), rule)
        if pts:
            panels.append((title, pts, rule))
    if not panels:
        return None
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.8 * rows), squeeze=False)
    for ax, (title, pts, rule) in zip(axes.flat, panels, strict=False):
        draw_panel(ax, title, pts, rule)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
