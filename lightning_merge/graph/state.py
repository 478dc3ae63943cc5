"""Mutable state of one trace: the union-find, registered parameter axes, pending taps.

Handlers receive an :class:`Op` (one fx node with its real argument values and their layouts) and
use its :class:`TraceState` to create feature variables, register parameter axes and join spaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .errors import GraphError, UnsupportedOpError
from .layout import Layout, ParamLayout
from .spec import AxisRef, Role
from .union_find import UnionFind


@dataclass
class PendingTap:
    """A consumer module's first input, resolved to spaces once tracing is done."""

    module: str
    node: fx.Node
    layout: Layout
    kind: str = "input"


@dataclass
class TraceState:
    uf: UnionFind = field(default_factory=UnionFind)
    members: list[tuple[int, AxisRef]] = field(default_factory=list)
    axis_var: dict[AxisRef, int] = field(default_factory=dict)
    taps: list[PendingTap] = field(default_factory=list)
    var_pos: dict[int, int] = field(default_factory=dict)  # var -> position of its creating node
    pos: int = 0  # position of the node being handled

    def new_var(self, size: int, name: str, group_size: int = 1) -> int:
        var = self.uf.new(size, name, group_size)
        self.var_pos[var] = self.pos
        return var

    def register(self, var: int, ref: AxisRef) -> None:
        """Add a parameter axis to ``var``'s space; a second registration (shared weights) joins."""
        if ref in self.axis_var:
            self.uf.union(self.axis_var[ref], var, f"shared parameter {ref.param}")
            return
        self.axis_var[ref] = var
        self.members.append((var, ref))

    def register_layout(self, layout: Layout, param: str, axis: int, role: Role) -> None:
        """Register ``param``'s ``axis`` as laid out like ``layout``'s channel axis (one ref per segment)."""
        for var, off, _ in layout.segs:
            ref = AxisRef(param, axis, role, offset=off * layout.inner, inner=layout.inner)
            self.register(var, ref)

    def join(self, a: Layout, b: Layout, where: str) -> None:
        """Same features on the same channel axis: join segment by segment."""
        if a.is_fixed or b.is_fixed:
            raise GraphError(f"{where}: internal error, join of a fixed layout")
        bounds_a = [(o, s) for _, o, s in a.segs]
        bounds_b = [(o, s) for _, o, s in b.segs]
        if bounds_a != bounds_b or a.inner != b.inner:
            raise GraphError(
                f"{where}: operands split their channels differently ({bounds_a}×{a.inner} vs "
                f"{bounds_b}×{b.inner}); join them by hand (see docs/graph.md)"
            )
        for (va, _, _), (vb, _, _) in zip(a.segs, b.segs, strict=True):
            self.uf.union(va, vb, where)

    def fix(self, layout: Layout) -> None:
        for v in layout.vars():
            self.uf.fix(v)

    def tap(self, module: str, node: Any, layout: Layout, kind: str = "input") -> None:
        if isinstance(node, fx.Node) and isinstance(layout, Layout) and not layout.is_fixed:
            self.taps.append(PendingTap(module, node, layout, kind))


@dataclass
class Op:
    """One fx node as a handler sees it: real values (``args``) and layouts (``lay_args``)."""

    state: TraceState
    node: fx.Node
    module: nn.Module | None
    args: tuple
    kwargs: dict
    lay_args: tuple
    lay_kwargs: dict
    out: Any

    @property
    def name(self) -> str:
        """Module path for ``call_module`` nodes, else the fx node name."""
        return str(self.node.target) if self.node.op == "call_module" else self.node.name

    @property
    def op_name(self) -> str:
        t = self.node.target
        if self.module is not None:
            return f"module {type(self.module).__module__}.{type(self.module).__qualname__}"
        if self.node.op == "call_method":
            return f"method Tensor.{t}"
        mod = getattr(t, "__module__", None) or ""
        return f"function {mod + '.' if mod else ''}{getattr(t, '__name__', t)}"

    def arg(self, i: int, key: str, default: Any = None) -> Any:
        if i < len(self.args):
            return self.args[i]
        return self.kwargs.get(key, default)

    def lay(self, i: int, key: str = "input") -> Any:
        if i < len(self.lay_args):
            return self.lay_args[i]
        return self.lay_kwargs.get(key)

    def param(self, suffix: str) -> str:
        return f"{self.node.target}.{suffix}"

    def fail(self, reason: str) -> UnsupportedOpError:
        return UnsupportedOpError(self.op_name, self.node.name, reason)

    def out_shape(self) -> tuple[int, ...]:
        if not isinstance(self.out, torch.Tensor):
            raise self.fail("expected a tensor output")
        return tuple(self.out.shape)


def is_layout(x: Any) -> bool:
    return isinstance(x, (Layout, ParamLayout))


def fixed_like(value: Any) -> Any:
    """The layout of a value that carries no merge-point features (mirrors tuples/lists/dicts)."""
    if isinstance(value, torch.Tensor):
        return Layout.fixed(value.dim())
    if isinstance(value, (tuple, list)):
        items = [fixed_like(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: fixed_like(v) for k, v in value.items()}
    return None


def flat_layouts(x: Any) -> list[Layout | ParamLayout]:
    """All layouts inside a nested args structure."""
    if is_layout(x):
        return [x]
    if isinstance(x, (tuple, list)):
        return [lay for v in x for lay in flat_layouts(v)]
    if isinstance(x, dict):
        return [lay for v in x.values() for lay in flat_layouts(v)]
    return []
