"""Train (or load from a cache) source models programmatically, with a quiet Trainer.

``train_source`` is what scripts, tests and benchmarks call: its checkpoint is cached under a name
keyed by *all* its arguments, so a second call with the same arguments loads instead of training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_merge.data.datamodule import TaskSplitDataModule
from lightning_merge.dataflow import model_device
from lightning_merge.models.classifier import SourceClassifier
from lightning_merge.models.plateau import PlateauRule, PlateauStopping

log = logging.getLogger(__name__)

TEST_CACHE_DIR = ".cache/test_models"
#: Bumped whenever a change of code changes what a cached checkpoint would hold.
CACHE_VERSION = 2
#: Training images held out for validation when a source trains to a plateau (all classes; about
#: half of them fall in a 5-class task).
PLATEAU_VAL_SIZE = 5000


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's informational logs and its data-loader-worker hints while training."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
            warnings.filterwarnings(
                "ignore", ".*number of training batches.*smaller than the logging interval.*"
            )
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def state_dict_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A content hash of a state dict (names, dtypes, shapes and values)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _load_init(model: SourceClassifier, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Accept either a ``SourceClassifier`` state dict or the state dict of its network ``.model``."""
    if all(k.startswith("model.") for k in state_dict):
        state_dict = {k[len("model.") :]: v for k, v in state_dict.items()}
    model.model.load_state_dict(state_dict, strict=True)


def cache_path(cache_dir: str | Path, key: Mapping[str, Any]) -> Path:
    """``<cache_dir>/<arch>_w<width>_c<classes>_s<seed>_<hash of all args>.ckpt``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    classes = "-".join(str(c) for c in key["classes"])
    return Path(cache_dir) / f"{key['arch']}_w{key['width']}_c{classes}_s{key['seed']}_{digest}.ckpt"


def source_key(
    arch: str,
    classes: Sequence[int],
    seed: int,
    *,
    width: float = 1,
    max_epochs: int = 1,
    limit_train_batches: int | float | None = None,
    init_state_dict: Mapping[str, torch.Tensor] | None = None,
    dataset: str = "fashion_mnist",
    batch_size: int = 128,
    precision: str | None = None,
    plateau: PlateauRule | None = None,
    **model_kwargs: Any,
) -> dict[str, Any]:
    """Everything that determines a trained source model (the cache key of ``train_source``).

    ``precision`` and ``plateau`` (with the validation hold-out it needs) enter the key only when set,
    so checkpoints trained before they existed keep their names.
    """
    key = {
        "version": CACHE_VERSION,
        "arch": arch,
        "classes": [int(c) for c in classes],
        "seed": int(seed),
        "width": width,
        "max_epochs": max_epochs,
        "limit_train_batches": limit_train_batches,
        "init": None if init_state_dict is None else state_dict_digest(init_state_dict),
        "dataset": dataset,
        "batch_size": batch_size,
        "model_kwargs": dict(sorted(model_kwargs.items())),
    }
    if precision is not None:
        key["precision"] = str(precision)
    if plateau is not None:
        key["plateau"] = plateau.as_dict()
        key["val_size"] = PLATEAU_VAL_SIZE
    return key


def train_source(
    arch: str,
    classes: Sequence[int],
    seed: int,
    *,
    width: float = 1,
    max_epochs: int = 1,
    limit_train_batches: int | float | None = None,
    init_state_dict: Mapping[str, torch.Tensor] | None = None,
    cache_dir: str | Path | None = None,
    root: str | None = None,
    dataset: str = "fashion_mnist",
    batch_size: int = 128,
    progress_bar: bool = False,
    precision: str | None = None,
    plateau: PlateauRule | None = None,
    **model_kwargs: Any,
) -> SourceClassifier:
    """Train one source model on ``classes`` (all their training images) and return it in eval mode.

    ``model_kwargs`` go to :class:`SourceClassifier` (``head``, ``lr``, ``in_channels``, ...).
    ``init_state_dict`` starts from given weights (e.g. to fine-tune copies of one base model).
    With ``cache_dir`` the checkpoint is written there and reused by later calls with equal arguments.
    ``precision`` is Lightning's Trainer precision (None: full float32); ``"bf16-mixed"`` trains the
    wide nets about 2x faster on a CPU with AVX512-BF16.
    ``plateau``: hold out :data:`PLATEAU_VAL_SIZE` training images, validate after every epoch and stop
    when the rule says the validation accuracy has plateaued (``max_epochs`` is then the cap); the
    epoch curve goes into the checkpoint's JSON record (:func:`source_record`).
    """
    _check_plateau(plateau, max_epochs)
    key = source_key(
        arch,
        classes,
        seed,
        width=width,
        max_epochs=max_epochs,
        limit_train_batches=limit_train_batches,
        init_state_dict=init_state_dict,
        dataset=dataset,
        batch_size=batch_size,
        precision=precision,
        plateau=plateau,
        **model_kwargs,
    )
    path = cache_path(cache_dir, key) if cache_dir is not None else None
    if path is not None and path.is_file():
        log.info("loading cached source model %s", path)
        return load_source(path)
    model, record = _fit(key, model_kwargs, root, init_state_dict, plateau, progress_bar)
    if path is not None:
        _save(model, path, record)
    log.info(
        "trained %s on classes %s (seed %d) in %.1f s", arch, key["classes"], seed, record["train_seconds"]
    )
    return model.cpu().eval()


def _check_plateau(plateau: PlateauRule | None, max_epochs: int) -> None:
    if plateau is not None and not isinstance(plateau, PlateauRule):
        raise TypeError(f"plateau must be a PlateauRule or None, got {type(plateau).__name__}")
    if plateau is not None and max_epochs < plateau.min_epochs:
        raise ValueError(
            f"max_epochs={max_epochs} is below the plateau rule's min_epochs={plateau.min_epochs}"
        )


def _fit(
    key: Mapping[str, Any],
    model_kwargs: Mapping[str, Any],
    root: str,
    init_state_dict: Mapping[str, torch.Tensor] | None,
    plateau: PlateauRule | None,
    progress_bar: bool,
) -> tuple[SourceClassifier, dict[str, Any]]:
    """Train the source ``key`` describes; its record: the key, the time and (plateau) the curve."""
    with quiet_lightning():
        pl.seed_everything(key["seed"], verbose=False)
        classes, val_size = list(key["classes"]), key.get("val_size", 0)
        data = TaskSplitDataModule(root, key["dataset"], [classes], 0, key["batch_size"], val_size=val_size)
        model = SourceClassifier(arch=key["arch"], width=key["width"], classes=classes, **model_kwargs)
        if init_state_dict is not None:
            _load_init(model, init_state_dict)
        stopper = PlateauStopping(plateau) if plateau is not None else None
        trainer = _trainer(
            key["max_epochs"], key["limit_train_batches"], key.get("precision"), progress_bar, stopper
        )
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        seconds = time.perf_counter() - start
    record = {**key, "train_seconds": seconds}
    if stopper is not None:
        record |= stopper.record() | {"epoch_seconds": seconds / max(1, len(stopper.curve))}
    return model, record


def _trainer(
    max_epochs: int,
    limit_train_batches: int | float | None,
    precision: str | None,
    progress_bar: bool,
    stopper: PlateauStopping | None = None,
) -> pl.Trainer:
    """A quiet single-device trainer without logger or checkpoint callback; it validates after every
    epoch only with a plateau ``stopper``."""
    return pl.Trainer(
        accelerator="auto",
        devices=1,
        max_epochs=max_epochs,
        limit_train_batches=limit_train_batches,
        precision=precision if precision is not None else "32-true",
        limit_val_batches=None if stopper is not None else 0,
        num_sanity_val_steps=0,
        callbacks=[stopper] if stopper is not None else None,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
    )


def _save(model: SourceClassifier, path: Path, record: dict[str, Any]) -> None:
    """The weights-only checkpoint (atomically) and its JSON record beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    model.trainer.save_checkpoint(tmp, weights_only=True)
    os.replace(tmp, path)
    path.with_suffix(".json").write_text(json.dumps(record, indent=2))


def source_record(path: str | Path) -> dict[str, Any] | None:
    """The JSON record written beside a cached checkpoint (its key, training time and, for a source
    trained to a plateau, its epochs and validation curve); None when there is none."""
    record = Path(path).with_suffix(".json")
    return json.loads(record.read_text()) if record.is_file() else None


def load_source(path: str | Path) -> SourceClassifier:
    """Load a ``SourceClassifier`` checkpoint (``train_source`` or ``lightning-merge fit``) in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"source checkpoint {path} not found; train it with `lightning-merge fit --config ...` "
            "or lightning_merge.models.train_source(...)"
        )
    return SourceClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()


@torch.no_grad()
def task_accuracy(model: SourceClassifier, loader: DataLoader) -> float:
    """Accuracy of ``model`` over its own classes on ``loader`` (labels must be in its task)."""
    model.eval()
    device = model_device(model)
    correct = total = 0
    for images, labels in loader:
        logits = model.own_logits(model(images.to(device)))
        correct += int((logits.argmax(-1) == model.targets(labels.to(device))).sum())
        total += len(labels)
    if total == 0:
        raise ValueError("task_accuracy got an empty data loader")
    return correct / total


def quick_pair(
    arch: str = "mlp",
    *,
    width: float = 1,
    head: str = "embedding",
    tasks: Sequence[Sequence[int]] = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9)),
    seeds: Sequence[int] = (0, 1),
    limit_train_batches: int | None = None,
    cache_dir: str | Path = TEST_CACHE_DIR,
    **kwargs: Any,
) -> list[SourceClassifier]:
    """Small source models (one per task, different seeds) trained on a subset in well under a minute.

    For tests and examples: by default one epoch capped at 150 batches (MLP, lr 0.05) or 60 batches
    (conv nets, lr 0.1), cached under ``.cache/test_models`` so repeated runs load instantly.
    """
    if len(tasks) != len(seeds):
        raise ValueError(f"quick_pair needs one seed per task, got {len(tasks)} tasks and {len(seeds)} seeds")
    if limit_train_batches is None:
        limit_train_batches = 150 if arch == "mlp" else 60
    kwargs.setdefault("lr", 0.05 if arch == "mlp" else 0.1)
    return [
        train_source(
            arch,
            list(task),
            seed,
            width=width,
            head=head,
            max_epochs=1,
            limit_train_batches=limit_train_batches,
            cache_dir=cache_dir,
            **kwargs,
        )
        for task, seed in zip(tasks, seeds, strict=True)
    ]
