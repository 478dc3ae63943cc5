"""Save and load :class:`Statistics`: one ``.safetensors`` file plus a JSON sidecar describing it.

The sidecar (``<file>.json``) records what the tensors are: format version, number of models,
graph digest, per-model weight fingerprints, counts, the ordered tensor keys and the SHA-256 of the
tensor file. Both files are written atomically (temporary file + ``os.replace``), tensors first,
so a crash leaves either the old pair, or a tensor file whose checksum does not match its sidecar:
a partial or truncated save is always detected on load. The round trip is bitwise exact.

Tensor keys: ``moments/<space>/{count,total,outer}``, ``grams/<i>/<module>``,
``fisher/<i>/<param>``, ``kfac/<i>/<module>/{A,G}``, ``joint_inputs/<module>/{count,total,outer}``.
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
from lightning_merge.stats.container import FeatureMoments, Statistics

FORMAT = "lightning_merge.statistics"
VERSION = 1
_MOMENT_FIELDS = ("count", "total", "outer")
_KINDS = ("moments", "grams", "fisher", "kfac", "joint_inputs")


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
    tensors = _flatten(stats)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "num_models": stats.num_models,
        "graph_digest": stats.graph_digest,
        "model_fingerprints": list(model_fingerprints) if model_fingerprints is not None else None,
        "statistics": [k for k in _KINDS if getattr(stats, k)],
        "moment_counts": {s: float(m.count) for s, m in stats.moments.items()},
        "gram_counts": stats.gram_counts,
        "fisher_counts": stats.fisher_counts,
        "kfac_counts": stats.kfac_counts,
        "num_grams": len(stats.grams),
        "num_fisher": len(stats.fisher),
        "num_kfac": len(stats.kfac),
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
    return _unflatten(meta, tensors)


def _flatten(stats: Statistics) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}

    def put(key: str, tensor: torch.Tensor) -> None:
        out[key] = tensor.detach().to("cpu").contiguous()

    for space, m in stats.moments.items():
        for name in _MOMENT_FIELDS:
            put(f"moments/{space}/{name}", getattr(m, name))
    for module, m in stats.joint_inputs.items():
        for name in _MOMENT_FIELDS:
            put(f"joint_inputs/{module}/{name}", getattr(m, name))
    for i, grams in enumerate(stats.grams):
        for module, g in grams.items():
            put(f"grams/{i}/{module}", g)
    for i, fisher in enumerate(stats.fisher):
        for param, f in fisher.items():
            put(f"fisher/{i}/{param}", f)
    for i, kfac in enumerate(stats.kfac):
        for module, (a, g) in kfac.items():
            put(f"kfac/{i}/{module}/A", a)
            put(f"kfac/{i}/{module}/G", g)
    return out


def _unflatten(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Statistics:
    n = meta["num_models"]
    stats = Statistics(
        num_models=n,
        graph_digest=meta["graph_digest"],
        grams=[{} for _ in range(meta["num_grams"])],
        gram_counts=meta["gram_counts"],
        fisher=[{} for _ in range(meta["num_fisher"])],
        fisher_counts=meta["fisher_counts"],
        kfac=[{} for _ in range(meta["num_kfac"])],
        kfac_counts=meta["kfac_counts"],
    )
    moments: dict[str, dict[str, torch.Tensor]] = {}
    kfac: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key in meta["keys"]:
        kind, rest = key.split("/", 1)
        if kind in ("moments", "joint_inputs"):
            space, name = rest.rsplit("/", 1)
            moments.setdefault(f"{kind}/{space}", {})[name] = tensors[key]
        elif kind == "kfac":
            i, rest = rest.split("/", 1)
            module, factor = rest.rsplit("/", 1)
            kfac.setdefault((int(i), module), {})[factor] = tensors[key]
        else:
            i, name = rest.split("/", 1)
            getattr(stats, "grams" if kind == "grams" else "fisher")[int(i)][name] = tensors[key]
    for key, parts in moments.items():
        kind, space = key.split("/", 1)
        getattr(stats, kind)[space] = FeatureMoments(parts["count"], parts["total"], parts["outer"], n)
    for (i, module), parts in kfac.items():
        stats.kfac[i][module] = (parts["A"], parts["G"])
    return stats


def _read_sidecar(path: Path) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.is_file():
        raise StatisticsFileError(f"statistics file {path} has no sidecar {side}: the save did not finish")
    try:
        meta = json.loads(side.read_text())
    except json.JSONDecodeError as err:
        raise StatisticsFileError(f"sidecar {side} is not valid JSON: {err}") from err
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
