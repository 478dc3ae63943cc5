"""Errors raised while deriving or checking a merge graph."""

from __future__ import annotations

OVERRIDE_ADVICE = (
    "Give the groups by hand instead: register a handler for this op with "
    "`lightning_merge.graph.register_handler(...)`, or write the graph yourself "
    "(`MergeGraph.from_dict` / `load_graph(path)`, e.g. starting from a traced graph of a similar "
    "model saved with `save_graph`) and pass it to the merge. See docs/graph.md."
)


class GraphError(ValueError):
    """The model's feature flow cannot be turned into merge points."""


class UnsupportedOpError(GraphError):
    """An op the tracer has no handler for carries features of a merge point."""

    def __init__(self, op: str, node: str, reason: str = "no handler for this op") -> None:
        self.op = op
        self.node = node
        super().__init__(f"unsupported op {op} at fx node {node!r}: {reason}. {OVERRIDE_ADVICE}")


class EquivalenceError(AssertionError):
    """Permuting every merge point changed the model's output: the graph is wrong."""
