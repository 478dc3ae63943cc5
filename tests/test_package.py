"""The top-level namespace: lazy exports resolve to the real objects, unknown names raise."""

import pytest

import lightning_merge


@pytest.mark.parametrize("name", lightning_merge.__all__)
def test_every_export_resolves(name: str) -> None:
    assert getattr(lightning_merge, name) is not None


def test_registry_lists_every_method() -> None:
    assert set(lightning_merge.METHODS) >= {
        "average", "permute", "weight_matching", "zipit", "mudsc", "pleas",
        "task_arithmetic", "ties", "fisher", "regmean", "mats",
    }  # fmt: skip


def test_unknown_attribute_is_named() -> None:
    with pytest.raises(AttributeError, match="no attribute 'ZipIt'"):
        _ = lightning_merge.ZipIt


def test_unknown_method_lists_the_registered_ones() -> None:
    with pytest.raises(KeyError, match=r"unknown merge method 'zipp'.*'zipit'"):
        lightning_merge.get_method("zipp")
