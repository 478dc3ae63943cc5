"""The top-level namespace: lazy exports resolve to the real objects, unknown names raise."""

import pytest

import lightning_merge


@pytest.mark.parametrize("name", lightning_merge.__all__)
def test_every_export_resolves(name: str) -> None:
    assert getattr(lightning_merge, name) is not None


def test_every_method_is_listed_once_and_named_by_its_class() -> None:
    from lightning_merge.methods import MergeMethod

    methods = lightning_merge.ALL_METHODS
    assert len(set(methods)) == len(methods) and all(issubclass(m, MergeMethod) for m in methods)
    assert {m.name for m in methods} == {
        "average", "permute", "weight_matching", "zipit", "mudsc", "pleas", "aligned",
        "task_arithmetic", "ties", "fisher", "regmean", "mats",
    }  # fmt: skip
    import lightning_merge.methods as package

    assert all(getattr(package, m.__name__) is m for m in methods)  # importable by class name


def test_unknown_attribute_is_named() -> None:
    with pytest.raises(AttributeError, match="no attribute 'ZipIt'"):
        _ = lightning_merge.ZipIt


def test_no_string_registry_is_left() -> None:
    for name in ("METHODS", "get_method"):
        with pytest.raises(AttributeError):
            getattr(lightning_merge, name)
