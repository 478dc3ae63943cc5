"""Shared fixtures: the Fashion-MNIST data module and small trained source models (cached on disk).

Seeds of the trained test models: ``LIGHTNING_MERGE_TEST_SEED=k`` (default 0) shifts every training
seed the fixtures and tests use by ``k`` (see ``tests/trained.py``); the seed is in each checkpoint's
cache key, so each ``k`` trains its own models once. Every quality threshold is meant to hold for any
``k``: check a change of one with, e.g.,
``LIGHTNING_MERGE_TEST_SEED=100 .venv/bin/python -m pytest -q`` and ``=200`` as well as the default.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from trained import SEED_OFFSET, trained_pair

from lightning_merge.data import TaskSplitDataModule, default_root
from lightning_merge.models import SourceClassifier


@pytest.fixture(scope="session")
def fmnist() -> TaskSplitDataModule:
    """Fashion-MNIST with tasks [0..4] / [5..9], set up (loaded once per session)."""
    data = TaskSplitDataModule()
    data.setup()
    return data


MNIST_FILES = [f"{p}-{k}" for p in ("train", "t10k") for k in ("images-idx3-ubyte", "labels-idx1-ubyte")]


@pytest.fixture(scope="session")
def mnist_root() -> str:
    """The folder of MNIST's IDX files (``default_root("mnist")``); the test is skipped when it lacks
    them: ``scripts/setup.sh`` (which CI runs) fetches them, the library never downloads."""
    root = Path(default_root("mnist"))
    root = root if root.is_absolute() else Path(__file__).resolve().parents[1] / root  # the repository's
    missing = [f for f in MNIST_FILES if not (root / f).is_file() and not (root / f"{f}.gz").is_file()]
    if missing:
        pytest.skip(f"MNIST IDX files {missing} not in {root}: run `bash scripts/setup.sh`")
    return str(root)


@pytest.fixture(scope="session")
def source_pair() -> Callable[..., list[SourceClassifier]]:
    """``source_pair(arch="mlp", width=1, head="embedding")`` → two small source models.

    Task [0..4] with seed 0 and task [5..9] with seed 1 (plus the run's ``LIGHTNING_MERGE_TEST_SEED``),
    trained for one short epoch; the checkpoints are cached under ``.cache/test_models`` so only the
    first run pays (MLP ≈ 5 s, ResNet-20×1 ≈ 30 s).
    The models are shared by all tests: deep-copy before modifying them.
    """
    memo: dict[tuple, list[SourceClassifier]] = {}

    def get(arch: str = "mlp", **kwargs: object) -> list[SourceClassifier]:
        key = (arch, repr(sorted(kwargs.items())))
        if key not in memo:
            memo[key] = trained_pair(arch, **kwargs)
        return memo[key]

    return get


@pytest.fixture(scope="session")
def mlp_pair(source_pair: Callable[..., list[SourceClassifier]]) -> list[SourceClassifier]:
    """Two MLP sources with the shared embedding head."""
    return source_pair("mlp")


@pytest.fixture(scope="session")
def resnet_pair(source_pair: Callable[..., list[SourceClassifier]]) -> list[SourceClassifier]:
    """Two ResNet-20×1 sources with the shared embedding head."""
    return source_pair("resnet20")


def pytest_report_header() -> str:
    """Say which seeds trained the test models, so a failure report names the weights it saw."""
    return f"test models: LIGHTNING_MERGE_TEST_SEED={SEED_OFFSET}"
