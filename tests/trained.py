"""The trained test models' seeds and cache folder, in one place, so a whole run can switch seeds.

``LIGHTNING_MERGE_TEST_SEED=k`` (default 0) adds ``k`` to every training seed of the test models
(``trained_pair`` and the same-base family). The seed is part of each checkpoint's cache key, so every
offset trains and caches its own models next to the others. Training is bitwise reproducible on one
host only, so another host's weights are just another draw: running the suite under a few offsets is
how a quality threshold is checked to hold for any weights the training can produce.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl

from lightning_merge.models import SourceClassifier, quick_pair

SEED_ENV = "LIGHTNING_MERGE_TEST_SEED"
TEST_MODELS_DIR = Path(__file__).resolve().parents[1] / ".cache" / "test_models"


def seed_offset() -> int:
    """The offset from ``LIGHTNING_MERGE_TEST_SEED`` (0 when unset); a non-integer is an error."""
    raw = os.environ.get(SEED_ENV, "0").strip() or "0"
    try:
        offset = int(raw)
    except ValueError:
        raise ValueError(f"{SEED_ENV} must be a non-negative integer, got {raw!r}") from None
    if offset < 0:
        raise ValueError(f"{SEED_ENV} must be a non-negative integer, got {offset}")
    return offset


SEED_OFFSET = seed_offset()


def shifted(*base: int) -> tuple[int, ...]:
    """Training seeds ``base`` shifted by the run's offset."""
    return tuple(s + SEED_OFFSET for s in base)


def trained_pair(
    arch: str = "mlp", *, seeds: Sequence[int] = (0, 1), **kwargs: object
) -> list[SourceClassifier]:
    """``quick_pair`` with the run's seeds and the test cache: one model per task, trained once per host."""
    return quick_pair(arch, seeds=shifted(*seeds), cache_dir=TEST_MODELS_DIR, **kwargs)


def quiet_trainer(**kwargs: object) -> pl.Trainer:
    """A one-CPU trainer without logger, checkpoints, summary or progress bar (``kwargs`` override)."""
    defaults: dict[str, object] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    return pl.Trainer(**(defaults | kwargs))
