"""Derive a :class:`MergeGraph` from a model with torch.fx.

Two passes: a symbolic trace (modules with a handler are leaves) gives the op graph, then an fx
``Interpreter`` runs the example input through it. Next to every real value it propagates a
:class:`~lightning_merge.graph.layout.Layout` (which feature variables sit on which axis), calling
the handler of each node; handlers register parameter axes and join variables in a union-find.
Finally every non-fixed union-find class becomes a ``Space`` (in forward order), consumer inputs
become ``Tap``s and single-space bottleneck nodes become ``CutPoint``s.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

from . import ops as _ops  # noqa: F401  (fills the handler table)
from . import swin as _swin  # noqa: F401  (torchvision Swin handlers)
from .errors import OVERRIDE_ADVICE, GraphError
from .layout import Layout, ParamLayout
from .registry import module_handler, op_handler
from .spec import CutPoint, MergeGraph, Segment, Space, Tap
from .state import Op, TraceState, fixed_like, flat_layouts


class _Tracer(fx.Tracer):
    """torch.nn modules and every module with a handler (e.g. ClassEmbedding) stay leaves."""

    def __init__(self, extra: dict | None) -> None:
        super().__init__()
        self.extra = extra

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, nn.Sequential):
            return False
        return module_handler(m, self.extra) is not None or super().is_leaf_module(m, qualname)


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


class _Propagator(fx.Interpreter):
    """Runs the graph on real tensors and records each node's layout."""

    def __init__(self, gm: fx.GraphModule, state: TraceState, extra: dict | None) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # our errors already name the node
        self.state, self.extra = state, extra
        self.layouts: dict[fx.Node, Any] = {}
        self.tensor_names = set(gm.state_dict().keys())
        self.position = {n: i for i, n in enumerate(gm.graph.nodes)}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.state.pos = self.position[n]
        self.layouts[n] = self._layout(n, value)
        return value

    def _layout(self, n: fx.Node, value: Any) -> Any:
        if n.op == "placeholder":
            return fixed_like(value)  # the network input's channels are fixed
        if n.op == "get_attr":
            if isinstance(value, torch.Tensor) and n.target in self.tensor_names:
                return ParamLayout(str(n.target), tuple(range(value.dim())))
            return fixed_like(value)
        lay_args = fx.node.map_arg(n.args, lambda a: self.layouts[a])
        lay_kwargs = fx.node.map_arg(n.kwargs, lambda a: self.layouts[a])
        if n.op == "output":
            for lay in flat_layouts(lay_args):  # the output's channels are fixed
                if isinstance(lay, Layout):
                    self.state.fix(lay)
            return None
        if not _has_tensor(value):
            return None
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        module = self.fetch_attr(n.target) if n.op == "call_module" else None
        op = Op(self.state, n, module, tuple(args), dict(kwargs), tuple(lay_args), dict(lay_kwargs), value)
        handler = (
            module_handler(module, self.extra)
            if module is not None
            else op_handler(n.op, n.target, self.extra)
        )
        if handler is None:
            inputs = flat_layouts((lay_args, lay_kwargs))
            if any(isinstance(x, Layout) and not x.is_fixed for x in inputs):
                raise op.fail("no handler for this op, and its input carries merge-point features")
            if any(isinstance(x, ParamLayout) for x in inputs) or (
                module is not None and any(True for _ in module.parameters())
            ):
                raise op.fail("no handler for this op, and it has parameters whose axes cannot be assigned")
            return fixed_like(value)  # only fixed inputs: its output cannot depend on a permutation
        return handler(op)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Trace without updating BatchNorm statistics or sampling dropout; restore modes after."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes.items():
            m.train(mode)


def symbolic_trace(model: nn.Module, handlers: dict | None = None) -> fx.GraphModule:
    """fx-trace ``model`` with the leaf rule of the merge-graph tracer; clear error if it fails."""
    try:
        graph = _Tracer(handlers).trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, AttributeError... on dynamic code
        raise GraphError(f"torch.fx could not trace {type(model).__name__}: {e}. {OVERRIDE_ADVICE}") from e
    return fx.GraphModule(model, graph)


def trace_graph(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    overrides: dict | None = None,
    handlers: dict | None = None,
) -> MergeGraph:
    """Derive the merge points of ``model`` by running ``example_input`` through its fx graph.

    ``handlers`` adds or replaces table entries for this call (same keys as ``register_handler``);
    ``overrides`` corrects the result by hand: ``{"join": [[a, b], ...], "fix": [name, ...]}``
    (see :func:`lightning_merge.graph.manual.apply_overrides`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"trace_graph: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"trace_graph: example_input must be a tensor, got {type(example_input).__name__}")
    gm = symbolic_trace(model, handlers)
    state = TraceState()
    prop = _Propagator(gm, state, handlers)
    with _eval_mode(model):
        prop.run(example_input)
    graph = _build(gm, state, prop.layouts, model)
    if overrides:
        from .manual import apply_overrides

        graph = apply_overrides(graph, overrides)
    return graph


def _build(gm: fx.GraphModule, state: TraceState, layouts: dict, model: nn.Module) -> MergeGraph:
    uf = state.uf
    members: dict[int, list] = {}
    for var, ref in state.members:
        root = uf.find(var)
        if root and ref not in members.setdefault(root, []):
            members[root].append(ref)
    names: dict[int, str] = {}
    used: set[str] = set()
    for root in sorted(members):
        name, k = uf.name[root], 1
        while name in used:
            name, k = f"{uf.name[root]}_{k}", k + 1
        names[root] = name
        used.add(name)
    spaces = [Space(names[r], uf.size[r], members[r], uf.group[r]) for r in sorted(members)]
    taps = _taps(state, names)
    _check_observed(spaces, taps)
    first = {names[r]: state.var_pos[r] for r in names}
    cuts = _cut_points(gm, layouts, uf, names, first)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return MergeGraph(spaces=spaces, taps=taps, cut_points=cuts, param_shapes=shapes)


def _segments(layout: Layout, uf: Any, names: dict[int, str]) -> tuple[Segment, ...]:
    segs = []
    for var, off, size in layout.segs:
        root = uf.find(var)
        if root in names:
            segs.append(Segment(names[root], off, size))
    return tuple(segs)


def _taps(state: TraceState, names: dict[int, str]) -> list[Tap]:
    """One input tap per distinct fx input node (a block's conv1 and shortcut share one)."""
    taps, seen = [], set()
    for t in state.taps:
        segs = _segments(t.layout, state.uf, names)
        key = (t.node, t.kind, t.module if t.kind == "attention" else None)
        if not segs or key in seen:
            continue
        seen.add(key)
        lay = t.layout
        dim = -1 if lay.dim == lay.ndim - 1 else lay.dim
        taps.append(Tap(t.module, dim, segs, lay.inner, t.kind))
    return taps


def _check_observed(spaces: list[Space], taps: list[Tap]) -> None:
    seen = {seg.space for t in taps for seg in t.segments}
    missing = [s.name for s in spaces if s.name not in seen]
    if missing:
        raise GraphError(
            f"merge points {missing} are read by no Conv/Linear/attention module, so no tap can "
            f"observe their features; fix them or add a tap by hand. {OVERRIDE_ADVICE}"
        )


def _cut_points(
    gm: fx.GraphModule, layouts: dict, uf: Any, names: dict[int, str], first: dict[str, int]
) -> list[CutPoint]:
    """Nodes every input→output path crosses; on a topological order, no edge may jump over them."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    carries = {n for n in nodes if layouts.get(n) is not None and n.op != "get_attr"} | {
        n for n in nodes if n.op in ("placeholder", "output")
    }
    fwd = _reach([n for n in nodes if n.op == "placeholder"], lambda n: n.users, carries)
    bwd = _reach([n for n in nodes if n.op == "output"], lambda n: n.all_input_nodes, carries)
    on_path = [n for n in nodes if n in fwd and n in bwd]
    cover = [0] * (len(nodes) + 1)
    for n in on_path:
        for u in n.users:
            if u in bwd and pos[u] > pos[n] + 1:
                cover[pos[n] + 1] += 1
                cover[pos[u]] -= 1
    jumped, acc = set(), 0
    for i in range(len(nodes)):
        acc += cover[i]
        if acc:
            jumped.add(i)
    order = sorted(first.values())
    cuts: list[CutPoint] = []
    prev: tuple[int, str] | None = None  # (index in on_path, space) of the last cut kept
    for k, n in enumerate(on_path):
        lay = layouts[n]
        if n.op in ("placeholder", "output") or pos[n] in jumped or not isinstance(lay, Layout):
            continue
        segs = _segments(lay, uf, names)
        if lay.is_fixed or lay.inner != 1 or len(lay.segs) != 1 or len(segs) != 1:
            continue
        space = segs[0].space
        depth = sum(p <= pos[n] for p in order) / len(order)
        cut = CutPoint(n.name, space, -1 if lay.dim == lay.ndim - 1 else lay.dim, depth)
        if prev is not None and prev == (k - 1, space):
            cuts[-1] = cut  # a run of cut nodes in one space (conv, bn, relu, pool): keep the last
        else:
            cuts.append(cut)
        prev = (k, space)
    return cuts


def _reach(starts: list[fx.Node], step: Any, allowed: set[fx.Node]) -> set[fx.Node]:
    seen, stack = set(starts), list(starts)
    while stack:
        for m in step(stack.pop()):
            if m in allowed and m not in seen:
                seen.add(m)
                stack.append(m)
    return seen
