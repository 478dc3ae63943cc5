"""Stage 1–2 of a merge: load the sources, check them, trace (or read) and check the merge graph.

The result, :class:`PreparedSources`, is everything later stages need about the inputs of a merge:
the N networks (eval mode, no gradients), how each one's outputs map to global classes, their
weight fingerprints, the architecture hyperparameters (when the sources are the project's
classifiers), the shared base (same-base methods) and the merge graph, checked on one batch by
permuting every merge point at random (a graph that would merge wrongly stops here, named).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from lightning_merge.apply.batchnorm_reset import reset_batchnorm
from lightning_merge.apply.twin import check_equivalence
from lightning_merge.dataflow import Ranks
from lightning_merge.evaluation import SourceHead, head_of
from lightning_merge.graph import MergeGraph, load_graph, trace_graph
from lightning_merge.pipeline.load import LoadedSource, Source, check_same_architecture, load_source
from lightning_merge.stats.store import model_fingerprint


@dataclass
class PreparedSources:
    """The checked inputs of one merge."""

    models: list[nn.Module]
    labels: list[str]
    heads: list[SourceHead]
    fingerprints: list[str]
    architecture: dict[str, Any] | None
    graph: MergeGraph
    base: nn.Module | None = None
    equivalence_error: float = 0.0


def prepare_sources(
    sources: Sequence[Source],
    tasks: Sequence[Sequence[int]],
    num_classes: int,
    example: torch.Tensor,
    *,
    base: Source | None = None,
    graph_file: str | os.PathLike | None = None,
    check_graph: bool = True,
    trusted: bool = False,
) -> PreparedSources:
    """Load and check the sources (and base), map their heads, trace or read the graph and check it.

    ``trusted`` unpickles every checkpoint in full (see :mod:`lightning_merge.pipeline.load`)."""
    loaded = [load_source(s, f"sources[{i}]", trusted=trusted) for i, s in enumerate(sources)]
    check_same_architecture(loaded)
    models = [_frozen(s.network) for s in loaded]
    base_model = None
    if base is not None:
        base_loaded = load_source(base, "base", trusted=trusted)
        check_same_architecture([loaded[0], base_loaded])
        base_model = _frozen(base_loaded.network)
    heads = [_head(i, s, tasks, num_classes, example) for i, s in enumerate(loaded)]
    graph = merge_graph_of(models[0], example[:2], graph_file)
    error = check_equivalence(models[0], graph, example[:2]) if check_graph else 0.0
    return PreparedSources(
        models=models,
        labels=[s.name for s in loaded],
        heads=heads,
        fingerprints=[model_fingerprint(m) for m in models],
        architecture=loaded[0].architecture,
        graph=graph,
        base=base_model,
        equivalence_error=error,
    )


def _head(
    i: int, source: LoadedSource, tasks: Sequence[Sequence[int]], num_classes: int, example: torch.Tensor
) -> SourceHead:
    """Source i's head: its classifier's record, or what it declares, checked on its outputs."""
    model = source.classifier or source.network
    name = f"sources[{i}] ({source.name})"
    return head_of(i, model, tasks, num_classes, example, kind=source.head, classes=source.classes, name=name)


def merge_graph_of(
    model: nn.Module, example: torch.Tensor, graph_file: str | os.PathLike | None = None
) -> MergeGraph:
    """The merge graph: traced from ``example``, or read from ``graph_file`` (a model the tracer gets
    wrong); the equivalence check judges either."""
    if graph_file is None:
        return trace_graph(model, example)
    if not os.path.isfile(graph_file):
        raise FileNotFoundError(f"graph_file {os.fspath(graph_file)} does not exist")
    return load_graph(graph_file)


def _frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


@torch.no_grad()
def reset_source_batchnorm(
    prepared: PreparedSources, calibration: Iterable[Any], ranks: Ranks | None = None
) -> PreparedSources:
    """``prepared`` with reset copies of its sources: every BatchNorm's running statistics pooled over
    ``calibration`` (the union of the tasks' data), as ZipIt!'s and MuDSC's official pipelines do
    before gathering correlations; fingerprints are recomputed, so cached statistics of the untreated
    sources are not reused. The loaded sources are not modified; the base (if any) is left alone."""
    models = [reset_batchnorm(copy.deepcopy(m), calibration, ranks=ranks) for m in prepared.models]
    models = [m.eval().requires_grad_(False) for m in models]
    return replace(prepared, models=models, fingerprints=[model_fingerprint(m) for m in models])
