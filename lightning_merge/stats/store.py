"""Save and load :class:`Statistics`: one ``.safetensors`` file plus a JSON sidecar describing it.

The sidecar (``<file>.json``) records what the tensors are: format version, number of models,
graph digest, per-model weight fingerprints, each statistic's own metadata (e.g. its counts), the
ordered tensor keys and the SHA-256 of the tensor file. Both files are written atomically
(temporary file + ``os.replace``), tensors first, so a crash leaves either the old pair, or a tensor
file whose checksum does not match its sidecar: a partial or truncated save is always detected on
load. The round trip is bitwise exact.

What is saved is decided by each statistic's registered collector
(:meth:`~lightning_merge.stats.collector.StatisticCollector.to_tensors`): its tensors go under the
key prefix ``<name>/`` (e.g. ``moments/<space>/{count,total,outer}``, ``grams/<i>/<module>``,
``fisher/<i>/<param>``, ``kfac/<i>/<module>/{A,G}``), its metadata under ``statistic_meta[name]``.
Files of format version 1 (fixed fields, before the registry) are refused: gather them again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_merge.graph.spec import MergeGraph
from lightning_merge.stats.container import Statistics
from lightning_merge.stats.registry import statistic_collector

FORMAT = "lightning_merge.statistics"
VERSION = 2


class StatisticsFileError(ValueError):
    """The statistics file or its sidecar is missing, truncated, modified or of another format."""


class StatisticsMismatchError(ValueError):
    """The statistics were gathered for other models or another merge graph."""


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 (16 hex digits) of a model's state dict: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def save_statistics(
    stats: Statistics,
    path: str | os.PathLike[str],
    *,
    model_fingerprints: Sequence[str] | None = None,
) -> Path:
    """Write ``stats`` to ``path`` (safetensors) and its JSON sidecar; returns ``path``."""
    if model_fingerprints is not None and len(model_fingerprints) != stats.num_models:
        raise ValueError(
            f"model_fingerprints has {len(model_fingerprints)} entries for {stats.num_models} models"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, statistic_meta = flatten_statistics(stats)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "num_models": stats.num_models,
        "graph_digest": stats.graph_digest,
        "model_fingerprints": list(model_fingerprints) if model_fingerprints is not None else None,
        "statistics": list(statistic_meta),
        "statistic_meta": statistic_meta,
        "keys": list(tensors),
        "num_tensors": len(tensors),
        "sha256": sha256_file(tmp),
    }
    os.replace(tmp, path)
    side = sidecar_path(path)
    side_tmp = side.with_name(f"{side.name}.tmp{os.getpid()}")
    side_tmp.write_text(json.dumps(meta, indent=1))
    os.replace(side_tmp, side)
    return path


def load_statistics(
    path: str | os.PathLike[str],
    *,
    graph: MergeGraph | None = None,
    models: Sequence[nn.Module] | None = None,
) -> Statistics:
    """Read statistics saved by :func:`save_statistics`, checking integrity, graph and models."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no statistics file at {path}")
    meta = _read_sidecar(path)
    _check_origin(path, meta, graph, models)
    if sha256_file(path) != meta["sha256"]:
        raise StatisticsFileError(
            f"statistics file {path} does not match the checksum in its sidecar: "
            "it is truncated, partially written or was modified"
        )
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise StatisticsFileError(f"cannot read statistics file {path}: {err}") from err
    if len(tensors) != meta["num_tensors"] or set(tensors) != set(meta["keys"]):
        raise StatisticsFileError(
            f"statistics file {path} holds {len(tensors)} tensors, its sidecar lists {meta['num_tensors']}"
        )
    try:
        return unflatten_statistics(
            meta["num_models"], meta["graph_digest"], tensors, meta["statistic_meta"], meta["keys"]
        )
    except (KeyError, ValueError) as err:  # an unregistered statistic, a missing part, a failed check
        raise StatisticsFileError(f"cannot rebuild the statistics in {path}: {err}") from err


def flatten_statistics(stats: Statistics) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every gathered statistic as CPU tensors keyed ``<name>/<its key>``, and each one's metadata.

    Each value is checked by its collector first, so an inconsistent value is never written.
    """
    tensors: dict[str, torch.Tensor] = {}
    metas: dict[str, Any] = {}
    for name in stats.names():
        collector = statistic_collector(name)
        collector.check(stats[name], stats.num_models)
        own, metas[name] = collector.to_tensors(stats[name])
        for key, tensor in own.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"statistic {name!r}: to_tensors gave a {type(tensor).__name__} for {key!r}")
            tensors[f"{name}/{key}"] = tensor.detach().to("cpu").contiguous()
    return tensors, metas


def unflatten_statistics(
    num_models: int,
    graph_digest: str,
    tensors: dict[str, torch.Tensor],
    metas: dict[str, Any],
    keys: list[str],
) -> Statistics:
    """The inverse of :func:`flatten_statistics` (``keys``: the saved order), every value checked."""
    stats = Statistics(num_models=num_models, graph_digest=graph_digest)
    own: dict[str, dict[str, torch.Tensor]] = {name: {} for name in metas}
    for key in keys:
        name, rest = key.split("/", 1)
        if name not in own:
            raise StatisticsFileError(f"tensor {key!r} belongs to no statistic listed in the sidecar")
        own[name][rest] = tensors[key]
    for name, meta in metas.items():
        collector = statistic_collector(name)
        value = collector.from_tensors(own[name], meta, num_models)
        collector.check(value, num_models)
        stats[name] = value
    return stats


def _read_sidecar(path: Path) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.is_file():
        raise StatisticsFileError(f"statistics file {path} has no sidecar {side}: the save did not finish")
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as err:
        raise StatisticsFileError(f"sidecar {side} is not valid JSON: {err}") from err
    if meta.get("format") == FORMAT and meta.get("version") == 1:
        raise StatisticsFileError(
            f"sidecar {side} is of statistics format version 1 (fixed fields), which this version no "
            f"longer reads (it reads version {VERSION}): delete {path} and gather the statistics again"
        )
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise StatisticsFileError(
            f"sidecar {side} is format {meta.get('format')!r} version {meta.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}"
        )
    return meta


def _check_origin(
    path: Path, meta: dict[str, Any], graph: MergeGraph | None, models: Sequence[nn.Module] | None
) -> None:
    if graph is not None and graph.digest() != meta["graph_digest"]:
        raise StatisticsMismatchError(
            f"statistics in {path} were gathered for another graph "
            f"(digest {meta['graph_digest']}, this graph is {graph.digest()})"
        )
    if models is None:
        return
    saved = meta["model_fingerprints"]
    if len(models) != meta["num_models"]:
        raise StatisticsMismatchError(
            f"statistics in {path} were gathered for {meta['num_models']} models, got {len(models)}"
        )
    if saved is None:
        raise StatisticsMismatchError(
            f"statistics in {path} were saved without model fingerprints, so they cannot be checked "
            "against these models; load without models= to skip the check"
        )
    for i, (model, fingerprint) in enumerate(zip(models, saved, strict=True)):
        if model_fingerprint(model) != fingerprint:
            raise StatisticsMismatchError(
                f"statistics in {path} were gathered for other models: model {i}'s weights differ"
            )


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 16 MiB chunks (statistics files and exported weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()
