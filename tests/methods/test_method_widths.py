"""Merged widths asked as ratios: rounding, grouped spaces and the [n, N·n] range."""

import pytest

from lightning_merge.methods.transform_base import width_for


@pytest.mark.parametrize(
    ("n", "group", "models", "ratio", "expected"),
    [
        (64, 1, 2, 1.0, 64),
        (64, 1, 2, 1.5, 96),  # any width in [n, N·n] is reachable without groups
        (64, 1, 2, 1.26, 81),
        (64, 1, 3, 2.5, 160),
        (64, 16, 2, 1.5, 96),  # 4 heads of 16: a multiple of the 4 groups
        (64, 16, 2, 1.3, 84),
        (64, 1, 2, 2.0, 128),
    ],
)
def test_width_for_rounds_to_the_nearest_allowed_width(
    n: int, group: int, models: int, ratio: float, expected: int
) -> None:
    assert width_for(n, group, models, ratio, "space") == expected


def test_width_for_rejects_a_ratio_above_the_number_of_models() -> None:
    with pytest.raises(ValueError, match=r"width ratio 2.5 is outside \[1, N\] = \[1, 2\].*'layer1'"):
        width_for(64, 1, 2, 2.5, "layer1")
