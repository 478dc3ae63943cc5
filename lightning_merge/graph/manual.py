"""Giving or correcting a merge graph by hand, saving and loading it, and checking source models.

* ``join_spaces(graph, a, b)`` — one transform for two spaces the tracer kept apart;
* ``fix_space(graph, name)`` — never permute this space (its axes are averaged instead);
* ``apply_overrides(graph, {"join": [[a, b]], "fix": [name]})`` — the same as data (also
  ``trace_graph(..., overrides=...)``);
* ``save_graph`` / ``load_graph`` — JSON files that a user can write for a model fx cannot trace.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from math import lcm
from pathlib import Path

from torch import nn

from .spec import CutPoint, MergeGraph, Tap


def join_spaces(graph: MergeGraph, a: str, b: str) -> MergeGraph:
    """A new graph where space ``b`` is merged into ``a`` (same size required)."""
    sa, sb = graph.space(a), graph.space(b)
    if a == b:
        raise ValueError(f"join_spaces: cannot join {a!r} with itself")
    if sa.size != sb.size:
        raise ValueError(f"join_spaces: {a!r} has {sa.size} features but {b!r} has {sb.size}")
    g = copy.deepcopy(graph)
    ga = g.space(a)
    ga.members += [m for m in g.space(b).members if m not in ga.members]
    ga.group_size = lcm(ga.group_size, sb.group_size)
    g.spaces = [s for s in g.spaces if s.name != b]
    g.taps = _dedupe_taps([_rename_tap(t, b, a) for t in g.taps])
    g.cut_points = [
        CutPoint(c.node, a if c.space == b else c.space, c.channel_dim, c.depth) for c in g.cut_points
    ]
    return g


def fix_space(graph: MergeGraph, name: str) -> MergeGraph:
    """A new graph without space ``name``: its axes become fixed (averaged, never permuted)."""
    graph.space(name)  # KeyError naming the known spaces
    g = copy.deepcopy(graph)
    g.spaces = [s for s in g.spaces if s.name != name]
    taps = []
    for t in g.taps:
        segs = tuple(s for s in t.segments if s.space != name)
        if segs:
            taps.append(Tap(t.module, t.channel_dim, segs, t.inner, t.kind))
    g.taps = taps
    g.cut_points = [c for c in g.cut_points if c.space != name]
    return g


def apply_overrides(graph: MergeGraph, overrides: dict) -> MergeGraph:
    """Apply ``{"join": [[a, b], ...], "fix": [name, ...]}`` in that order."""
    unknown = set(overrides) - {"join", "fix"}
    if unknown:
        raise KeyError(f"unknown override keys {sorted(unknown)}; expected 'join' and/or 'fix'")
    for pair in overrides.get("join", []):
        if len(pair) != 2:
            raise ValueError(f"override join entries are [a, b] pairs, got {pair!r}")
        graph = join_spaces(graph, pair[0], pair[1])
    for name in overrides.get("fix", []):
        graph = fix_space(graph, name)
    return graph


def _rename_tap(t: Tap, old: str, new: str) -> Tap:
    segs = tuple(type(s)(new if s.space == old else s.space, s.offset, s.size) for s in t.segments)
    return Tap(t.module, t.channel_dim, segs, t.inner, t.kind)


def _dedupe_taps(taps: list[Tap]) -> list[Tap]:
    out: list[Tap] = []
    for t in taps:
        if t not in out:
            out.append(t)
    return out


def save_graph(graph: MergeGraph, path: str | Path) -> None:
    Path(path).write_text(json.dumps(graph.to_dict(), indent=1))


def load_graph(path: str | Path) -> MergeGraph:
    try:
        data = json.loads(Path(path).read_text())
        return MergeGraph.from_dict(data)
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a merge graph JSON file ({type(e).__name__}: {e})") from e


def check_compatible(models: Sequence[nn.Module]) -> None:
    """Every model must have model 0's parameter/buffer names and shapes (same architecture)."""
    if len(models) == 0:
        raise ValueError("check_compatible: no models given")
    ref = {k: tuple(v.shape) for k, v in models[0].state_dict().items()}
    for i, model in enumerate(models[1:], start=1):
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for name in list(ref) + [k for k in shapes if k not in ref]:
            if name not in shapes:
                raise ValueError(f"model {i} has no parameter {name!r} (model 0 has {ref[name]})")
            if name not in ref:
                raise ValueError(
                    f"model {i} has an extra parameter {name!r} {shapes[name]} absent from model 0"
                )
            if ref[name] != shapes[name]:
                raise ValueError(
                    f"model {i}: parameter {name!r} has shape {shapes[name]}, model 0 has {ref[name]}"
                )
