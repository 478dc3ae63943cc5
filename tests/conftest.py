"""Shared fixtures: the Fashion-MNIST data module and small trained source models (cached on disk)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from lightning_merge.data import TaskSplitDataModule
from lightning_merge.models import SourceClassifier, quick_pair

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_MODELS_DIR = REPO_ROOT / ".cache" / "test_models"


@pytest.fixture(scope="session")
def fmnist() -> TaskSplitDataModule:
    """Fashion-MNIST with tasks [0..4] / [5..9], set up (loaded once per session)."""
    data = TaskSplitDataModule()
    data.setup()
    return data


@pytest.fixture(scope="session")
def source_pair() -> Callable[..., list[SourceClassifier]]:
    """``source_pair(arch="mlp", width=1, head="embedding")`` → two small source models.

    Task [0..4] with seed 0 and task [5..9] with seed 1, trained for one short epoch; the checkpoints
    are cached under ``.cache/test_models`` so only the first run pays (MLP ≈ 5 s, ResNet-20×1 ≈ 30 s).
    The models are shared by all tests: deep-copy before modifying them.
    """
    memo: dict[tuple, list[SourceClassifier]] = {}

    def get(arch: str = "mlp", **kwargs: object) -> list[SourceClassifier]:
        key = (arch, repr(sorted(kwargs.items())))
        if key not in memo:
            memo[key] = quick_pair(arch, cache_dir=TEST_MODELS_DIR, **kwargs)
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
