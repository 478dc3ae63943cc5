"""lightning_merge.graph: merge points derived automatically with torch.fx, and their self-check.

>>> graph = trace_graph(model, example_input)       # spaces, taps, cut points
>>> check_equivalence(model, graph, example_input)  # permuting every space keeps the outputs
"""

from .equivalence import check_equivalence, permute_model, random_permutations
from .errors import EquivalenceError, GraphError, UnsupportedOpError
from .manual import apply_overrides, check_compatible, fix_space, join_spaces, load_graph, save_graph
from .registry import register_handler
from .spec import AxisRef, CutPoint, MergeGraph, Segment, Space, Tap
from .trace import trace_graph

__all__ = [
    "AxisRef",
    "CutPoint",
    "EquivalenceError",
    "GraphError",
    "MergeGraph",
    "Segment",
    "Space",
    "Tap",
    "UnsupportedOpError",
    "apply_overrides",
    "check_compatible",
    "check_equivalence",
    "fix_space",
    "join_spaces",
    "load_graph",
    "permute_model",
    "random_permutations",
    "register_handler",
    "save_graph",
    "trace_graph",
]
