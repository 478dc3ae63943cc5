"""lightning_merge: merge separately trained networks into one model, as a PyTorch Lightning plugin.

The main entry points, imported lazily so ``import lightning_merge`` stays cheap:

* :class:`MergeModule` — the LightningModule that gathers statistics, merges and evaluates;
* :class:`MergeStatistics` — the callback that runs the statistics pass;
* :func:`trace_graph` / :func:`check_equivalence` — the merge graph of any traceable model;
* ``ALL_METHODS`` — every merge method class (a method is named by its class, e.g. ``ZipItMerge``);
  :class:`MergeResult` — what ``method.merge(...)`` returns.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "MergeModule": "lightning_merge.module",
    "MergeStatistics": "lightning_merge.callbacks.statistics",
    "trace_graph": "lightning_merge.graph",
    "check_equivalence": "lightning_merge.apply.twin",
    "MergeGraph": "lightning_merge.graph.spec",
    "ALL_METHODS": "lightning_merge.methods",
    "MergeResult": "lightning_merge.methods",
    "collect_statistics": "lightning_merge.stats",
    "load_merged": "lightning_merge.pipeline.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_merge' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
