"""Export a merge: ``model.safetensors`` (the merged weights) + ``recipe.yaml`` (how it was made).

The recipe records the sources (paths and weight fingerprints), the method (class path and
arguments), the merge graph digest, a hash of the statistics, the metrics and the architecture
hyperparameters, which is enough for :func:`load_merged` to rebuild a plain ``nn.Module``: the
source architecture with every tensor replaced (and resized where the merged width differs). A
partial zip is rebuilt as the same ``PartialZipModel`` (merged trunk, per-source unmerge and tail)
cut at the recorded node.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_merge.apply.module import resize_to_state_dict
from lightning_merge.graph.spec import MergeGraph
from lightning_merge.methods.config import method_config
from lightning_merge.pipeline.prepare import PreparedSources
from lightning_merge.stats.container import Statistics
from lightning_merge.stats.store import flatten_statistics, sha256_file

FORMAT = "lightning_merge.merged"
VERSION = 1
WEIGHTS, RECIPE = "model.safetensors", "recipe.yaml"


def statistics_digest(stats: Statistics | None) -> str | None:
    """SHA-256 (16 hex digits) of every statistic tensor, by name: which data the merge saw.

    The tensors and their names are the ones the store saves (each statistic's collector decides).
    """
    if stats is None:
        return None
    h = hashlib.sha256()
    tensors, _ = flatten_statistics(stats)
    for key, tensor in sorted(tensors.items()):
        t = tensor.to(torch.float64).contiguous()
        h.update(f"{key}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def partial_cut(merged: nn.Module, graph: MergeGraph, method: Any) -> dict[str, Any] | None:
    """The cut of a partial zip (``{"node", "channel_dim", "space"}``), ``None`` for a full merge."""
    from lightning_merge.apply.partial import PartialZipModel, resolve_cut

    if not isinstance(merged, PartialZipModel):
        return None
    stop_at = getattr(method, "stop_at", None)
    if stop_at is None:
        raise ValueError(f"method {method.name!r} returned a partial zip but has no stop_at to record")
    cut = resolve_cut(graph, stop_at)
    return {"node": cut.node, "channel_dim": cut.channel_dim, "space": cut.space}


@dataclass(frozen=True)
class MergeRecord:
    """Everything a recipe says about one finished merge."""

    sources: PreparedSources
    method: Any
    merged: nn.Module
    repair: Any
    tasks: list[list[int]]
    base: str | None = None
    statistics: Statistics | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def recipe_of(record: MergeRecord) -> dict[str, Any]:
    """Everything needed to rebuild (and to re-run) a merge."""
    src = record.sources
    return {
        "format": FORMAT,
        "version": VERSION,
        "architecture": src.architecture,
        "sources": [
            {"path": path, "fingerprint": fp, "head": h.kind, "classes": list(h.classes)}
            for path, fp, h in zip(src.labels, src.fingerprints, src.heads, strict=True)
        ],
        "base": record.base,
        "method": method_config(record.method),
        "repair": record.repair,
        "tasks": [list(t) for t in record.tasks],
        "num_classes": src.heads[0].num_classes,
        "graph_digest": src.graph.digest(),
        "statistics_digest": statistics_digest(record.statistics),
        "partial": partial_cut(record.merged, src.graph, record.method),
        "metrics": {k: float(v) for k, v in record.metrics.items()},
    }


def export_merged(record: MergeRecord, directory: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``recipe.yaml`` of ``record.merged`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    recipe = recipe_of(record)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in record.merged.state_dict().items()}
    save_file(state, str(directory / WEIGHTS), metadata={"format": FORMAT})
    recipe["weights_sha256"] = sha256_file(directory / WEIGHTS)
    (directory / RECIPE).write_text(yaml.safe_dump(recipe, sort_keys=False))
    return directory


def read_recipe(directory: str | os.PathLike) -> dict[str, Any]:
    """The recipe of an export, checked for format and weight integrity."""
    directory = Path(directory)
    for name in (RECIPE, WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: not a lightning_merge export directory")
    recipe = yaml.safe_load((directory / RECIPE).read_text())
    if not isinstance(recipe, dict) or recipe.get("format") != FORMAT:
        raise ValueError(f"{directory / RECIPE} is not a lightning_merge merge recipe (format {FORMAT!r})")
    if recipe.get("weights_sha256") != sha256_file(directory / WEIGHTS):
        raise ValueError(
            f"{directory / WEIGHTS} does not match the checksum in its recipe: modified or truncated"
        )
    return recipe


def load_merged(directory: str | os.PathLike, template: nn.Module | None = None) -> nn.Module:
    """Rebuild the exported merged model as a plain ``nn.Module`` (eval mode, CPU).

    ``template`` is a source-architecture module; needed only when the sources were plain modules
    (no architecture hyperparameters in the recipe).
    """
    recipe = read_recipe(directory)
    state = load_file(str(Path(directory) / WEIGHTS))
    if template is None:
        template = _skeleton(recipe, directory)
    num_sources = len(recipe["sources"])
    if recipe.get("partial"):
        model = _partial_skeleton(template, recipe["partial"], num_sources)
    else:
        model = copy.deepcopy(template)
    return resize_to_state_dict(model, state).eval()


def _skeleton(recipe: dict[str, Any], directory: str | os.PathLike) -> nn.Module:
    from lightning_merge.models.registry import build_model

    arch = recipe.get("architecture")
    if not arch:
        raise ValueError(
            f"the recipe in {directory} has no architecture (the sources were plain modules): "
            "pass template= (a module of the source architecture) to load_merged"
        )
    kwargs = {k: v for k, v in arch.items() if k != "arch"}
    if kwargs.get("head") == "linear":
        kwargs["num_classes"] = len(recipe["sources"][0]["classes"])
    return build_model(arch["arch"], **kwargs)


def _partial_skeleton(template: nn.Module, cut: dict[str, Any], num_sources: int) -> nn.Module:
    """An (unsized) ``PartialZipModel`` cut at ``cut["node"]``; the state dict gives it its weights."""
    from torch import fx

    from lightning_merge.apply.partial import PartialZipModel, Unmerge, split_graph, trace_module

    trunk_graph, tail_graph, _ = split_graph(trace_module(template), cut["node"])
    trunk = fx.GraphModule(copy.deepcopy(template), trunk_graph, class_name="MergedTrunk")
    tails = [
        fx.GraphModule(copy.deepcopy(template), tail_graph, class_name="SourceTail")
        for _ in range(num_sources)
    ]
    unmerges = [Unmerge(torch.zeros(1, 1), cut["channel_dim"]) for _ in range(num_sources)]
    return PartialZipModel(trunk, unmerges, tails)
