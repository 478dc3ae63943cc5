"""Partial zipping: merge the models up to a cut point, then let every source finish on its own.

The merged trunk runs once; its output at the cut (m merged channels) is mapped back to each source's
n channels with that source's unmerge block U_i, and source i's own layers after the cut (its
"tail", with its own weights) produce its output. ``PartialZipModel`` takes one input and returns a
tuple with every source's output: a multi-head model whose FLOPs sit between one model and the
ensemble. Both trunk and tails are ``torch.fx.GraphModule``\\ s cut from the same trace, so the
result is a plain module tree independent of this library at inference time.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import fx, nn

from lightning_merge.apply.module import build_merged_module
from lightning_merge.apply.weights import merge_state_dicts
from lightning_merge.graph.spec import CutPoint, MergeGraph
from lightning_merge.graph.trace import symbolic_trace
from lightning_merge.match.transform import SpaceTransform


def trace_module(model: nn.Module) -> fx.GraphModule:
    """fx-trace ``model`` with the merge-graph tracer, so node names match the graph's cut points."""
    return symbolic_trace(model)


def resolve_cut(graph: MergeGraph, stop_at: str | float) -> CutPoint:
    """The cut point named ``stop_at``, or the one whose depth fraction is closest to it."""
    if not graph.cut_points:
        raise ValueError("the merge graph has no cut points: this architecture cannot be partially zipped")
    if isinstance(stop_at, str):
        for cut in graph.cut_points:
            if cut.node == stop_at:
                return cut
        raise KeyError(f"stop_at={stop_at!r} is not a cut point; known: {[c.node for c in graph.cut_points]}")
    if isinstance(stop_at, bool) or not isinstance(stop_at, (int, float)) or not 0.0 <= stop_at <= 1.0:
        raise ValueError(f"stop_at must be a cut point name or a depth fraction in [0, 1], got {stop_at!r}")
    return min(graph.cut_points, key=lambda c: (abs(c.depth - stop_at), c.depth))


class Unmerge(nn.Module):
    """Maps merged channels (m) to one source's channels (n) along ``channel_dim``: y = U_i · z."""

    def __init__(self, weight: torch.Tensor, channel_dim: int) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.register_buffer("weight", weight.detach().clone())  # (n, m)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        moved = z.movedim(self.channel_dim, -1)
        return (moved @ self.weight.T.to(moved.dtype)).movedim(-1, self.channel_dim)


class PartialZipModel(nn.Module):
    """Merged trunk → per-source unmerge → per-source tail; returns a tuple of every source's output.

    The trunk returns ``(cut value, *extra)``: ``extra`` are values computed before the cut that the
    tails also read (for instance the input itself for a ``x.size(0)``), passed to every tail.
    """

    def __init__(self, trunk: nn.Module, unmerges: Sequence[Unmerge], tails: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(unmerges) != len(tails):
            raise ValueError(f"got {len(unmerges)} unmerge maps for {len(tails)} tails")
        self.trunk = trunk
        self.unmerges = nn.ModuleList(unmerges)
        self.tails = nn.ModuleList(tails)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cut, *extra = self.trunk(*args)
        return tuple(tail(u(cut), *extra) for u, tail in zip(self.unmerges, self.tails, strict=True))


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = {node}, [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def split_graph(gm: fx.GraphModule, cut_name: str) -> tuple[fx.Graph, fx.Graph, list[str]]:
    """Split ``gm``'s graph at node ``cut_name`` into (trunk, tail, trunk-side names the tail reads)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    if cut_name not in nodes:
        raise KeyError(f"cut node {cut_name!r} is not in the traced graph")
    cut = nodes[cut_name]
    trunk_nodes = _ancestors(cut)
    tail_nodes = [n for n in gm.graph.nodes if n not in trunk_nodes and n.op not in ("placeholder", "output")]
    extra = [
        p
        for p in dict.fromkeys(p for n in tail_nodes for p in n.all_input_nodes)
        if p in trunk_nodes and p is not cut and p.op != "get_attr"
    ]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    extra += [p for p in output.all_input_nodes if p in trunk_nodes and p is not cut and p not in extra]

    trunk = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        if n in trunk_nodes or n.op == "placeholder":
            env[n] = trunk.node_copy(n, lambda a: env[a])
    trunk.output((env[cut], *[env[p] for p in extra]))

    tail = fx.Graph()
    tenv: dict[fx.Node, fx.Node] = {cut: tail.placeholder("cut")}
    for p in extra:
        tenv[p] = tail.placeholder(p.name)
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n in trunk_nodes and any(u not in trunk_nodes for u in n.users):
            tenv[n] = tail.node_copy(n, lambda a: tenv[a])
    for n in tail_nodes:
        tenv[n] = tail.node_copy(n, lambda a: tenv[a])
    tail.output(fx.node.map_arg(output.args[0], lambda a: tenv[a]))
    return trunk, tail, [p.name for p in extra]


def _graph_tensors(gm: fx.GraphModule, graph: fx.Graph) -> set[str]:
    """Names of the parameters/buffers a graph reads (through its modules and get_attr nodes)."""
    keys: set[str] = set()
    for n in graph.nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            keys |= {f"{n.target}.{k}" for k, _ in mod.named_parameters()}
            keys |= {f"{n.target}.{k}" for k, _ in mod.named_buffers()}
        elif n.op == "get_attr":
            keys.add(str(n.target))
    return keys


def build_partial(
    sources: Sequence[nn.Module],
    graph: MergeGraph,
    transforms: Mapping[str, SpaceTransform],
    cut: CutPoint | str | float,
) -> PartialZipModel:
    """Merge ``sources`` up to ``cut`` (a CutPoint, its node name or a depth fraction); tails stay apart."""
    cut = cut if isinstance(cut, CutPoint) else resolve_cut(graph, cut)
    if cut.space not in transforms:
        raise KeyError(f"no transform for merge point {cut.space!r} at the cut {cut.node!r}")
    gm = trace_module(sources[0])
    trunk_graph, tail_graph, _ = split_graph(gm, cut.node)
    keys = _graph_tensors(gm, trunk_graph)
    state_dicts = [s.state_dict() for s in sources]
    merged = build_merged_module(
        sources[0], merge_state_dicts(state_dicts, graph, transforms, keys=keys), strict=False
    )
    trunk = fx.GraphModule(merged, trunk_graph, class_name="MergedTrunk")
    t = transforms[cut.space]
    dtype = next(iter(state_dicts[0].values())).dtype
    unmerges = [Unmerge(t.unmerge_block(i).to(dtype), cut.channel_dim) for i in range(len(sources))]
    tails = [
        fx.GraphModule(copy.deepcopy(s), copy.deepcopy(tail_graph), class_name="SourceTail") for s in sources
    ]
    return PartialZipModel(trunk, unmerges, tails)
