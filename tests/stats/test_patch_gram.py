"""patch_gram: XᵀX / Σx of layer inputs equal the plain float64 product of F.unfold rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_merge.stats import patch_gram as pg


@pytest.fixture(autouse=True)
def _shift_on_small_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' inputs are tiny: let them take the shifted-product path anyway."""
    monkeypatch.setattr(pg, "SHIFT_MIN_ROWS", 1)
    monkeypatch.setattr(pg, "STRIDED_MIN_WORK", 1)


def _reference(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    if isinstance(layer, nn.Linear):
        rows = x.reshape(-1, x.shape[-1]).double()
    else:
        mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
        xp = F.pad(x.double(), layer._reversed_padding_repeated_twice, mode=mode)
        cols = F.unfold(xp, layer.kernel_size, layer.dilation, 0, layer.stride)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return rows.T @ rows, rows.sum(0), rows.shape[0]


CONVS = [
    {"kernel_size": 3, "padding": 1},
    {"kernel_size": 3, "padding": 0},
    {"kernel_size": 5, "padding": 4, "dilation": 2},
    {"kernel_size": (3, 1), "padding": (1, 0)},
    {"kernel_size": (2, 4), "padding": (0, 3)},
    {"kernel_size": 3, "padding": "same"},
    {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    {"kernel_size": 3, "padding": 2, "padding_mode": "circular"},
    {"kernel_size": 1},
    {"kernel_size": 3, "padding": 1, "stride": 2},  # the phases of a strided input
    {"kernel_size": 3, "padding": 1, "stride": (1, 2)},
    {"kernel_size": 7, "padding": 3, "stride": 2},
    {"kernel_size": 5, "padding": 4, "dilation": 2, "stride": 3},
    {"kernel_size": (2, 4), "padding": (0, 3), "stride": (3, 2)},
    {"kernel_size": 3, "padding": 2, "stride": 2, "padding_mode": "reflect"},
    {"kernel_size": 1, "stride": 2},  # unfolded fallback: no offset pairs share products
    {"kernel_size": 2, "stride": 2},  # unfolded fallback: non-overlapping patches
]


@pytest.mark.parametrize("kwargs", CONVS, ids=[str(sorted(c.items())) for c in CONVS])
def test_conv_gram_matches_unfolded_rows(kwargs: dict) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 4, **kwargs)
    x = torch.randn(3, 5, 9, 7)
    xx, xs, n = pg.input_gram(conv, x)
    ref_xx, ref_xs, ref_n = _reference(conv, x)
    assert n == ref_n
    assert xx.dtype == torch.float64 and xx.shape == ref_xx.shape
    torch.testing.assert_close(xx, ref_xx, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(xs, ref_xs, rtol=1e-12, atol=1e-10)


def test_chunks_of_images_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A memory cap of one image per chunk gives the same sums as one chunk."""
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 2, 3, padding=1)
    x = torch.randn(4, 6, 8, 10)
    whole = pg.input_gram(conv, x)[0]
    monkeypatch.setattr(pg, "CHUNK_BYTES", 1)
    torch.testing.assert_close(pg.input_gram(conv, x)[0], whole, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(whole, _reference(conv, x)[0], rtol=1e-12, atol=1e-10)


def test_small_inputs_take_the_rows_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg, "SHIFT_MIN_ROWS", 100)  # 25 output positions per image
    calls: list[int] = []
    monkeypatch.setattr(
        pg, "_shift_sums", lambda conv, parts, y, *_: calls.append(parts[0].shape[0]) or (None, None, None)
    )
    conv = nn.Conv2d(3, 2, 3, padding=1)
    x = torch.randn(3, 3, 5, 5)
    xx, _, n = pg.input_gram(conv, x)  # 75 rows < 100: unfolded rows
    assert calls == [] and n == 75
    torch.testing.assert_close(xx, _reference(conv, x)[0])
    pg.input_gram(conv, torch.randn(4, 3, 5, 5))
    assert calls == [4]


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv2d(6, 2, 3, padding=1),
        nn.Conv2d(6, 2, 3, padding=1, padding_mode="reflect"),
        nn.Conv2d(6, 2, 3, stride=2),
        nn.Linear(3, 2),
    ],
    ids=["conv-zeros", "conv-reflect", "conv-stride2", "linear"],
)
def test_several_inputs_equal_their_concatenation(layer: nn.Module) -> None:
    """The N models' inputs given apart (the joint statistic's case, never joined on the shifted path)
    give the Gram of their channel / feature concatenation."""
    torch.manual_seed(5)
    shape = (3, 4, 3) if isinstance(layer, nn.Linear) else (3, 3, 7, 6)
    parts = [torch.randn(shape) for _ in range(2)]
    xx, xs, n = pg.input_gram(layer, parts)
    ref_xx, ref_xs, ref_n = _reference(layer, torch.cat(parts, 1 if isinstance(layer, nn.Conv2d) else -1))
    assert n == ref_n
    torch.testing.assert_close(xx, ref_xx, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(xs, ref_xs, rtol=1e-12, atol=1e-10)


def test_inputs_of_other_shapes_are_named() -> None:
    with pytest.raises(
        ValueError, match=r"inputs to one Conv2d differ in shape: \[\(2, 3, 5, 5\), \(2, 3, 5, 4\)\]"
    ):
        pg.input_gram(nn.Conv2d(6, 2, 3), [torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 4)])


def test_linear_gram_over_every_leading_position() -> None:
    torch.manual_seed(2)
    lin = nn.Linear(7, 3)
    x = torch.randn(2, 5, 7)  # (batch, tokens, features): 10 rows
    xx, xs, n = pg.input_gram(lin, x)
    ref_xx, ref_xs, ref_n = _reference(lin, x)
    assert n == ref_n == 10
    torch.testing.assert_close(xx, ref_xx)
    torch.testing.assert_close(xs, ref_xs)


def test_sym_gram_blocks_equal_plain_product(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg, "SYM_BLOCK", 4)  # 11 columns: blocks of 4, 4, 3
    rows = torch.randn(30, 11, dtype=torch.float32)
    got = pg.sym_gram(rows)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, rows.double().T @ rows.double(), rtol=1e-12, atol=1e-12)


def test_bias_column_appends_sums_and_count() -> None:
    torch.manual_seed(3)
    x = torch.randn(6, 4)
    xx, xs, n = pg.input_gram(nn.Linear(4, 2), x)
    aug = torch.cat([x.double(), torch.ones(6, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(pg.with_bias_column(nn.Linear(4, 2), xx, xs, n), aug.T @ aug)
    assert pg.with_bias_column(nn.Linear(4, 2, bias=False), xx, xs, n) is xx


def test_unsupported_layers_are_named() -> None:
    with pytest.raises(ValueError, match="groups=2"):
        pg.input_gram(nn.Conv2d(4, 4, 3, groups=2), torch.randn(1, 4, 5, 5))
    with pytest.raises(TypeError, match="Conv1d"):
        pg.input_gram(nn.Conv1d(4, 4, 3), torch.randn(1, 4, 5))


SHIFTED = CONVS[:4] + CONVS[5:9] + CONVS[9:15]  # every conv whose sums come from shifted windows


@pytest.mark.parametrize("kwargs", SHIFTED, ids=[str(sorted(c.items())) for c in SHIFTED])
def test_normal_sums_cross_product_matches_unfolded_rows(
    kwargs: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """YᵀX from shifted windows equals targets times unfolded patch rows (every conv above that the
    shifted windows serve, strided ones through their phases)."""
    monkeypatch.setattr(pg, "CHUNK_BYTES", 8 * 5 * 9 * 7 * 2 * 2)  # two images per chunk
    torch.manual_seed(4)
    conv = nn.Conv2d(5, 4, **kwargs)
    x = torch.randn(5, 5, 9, 7)
    y = torch.randn_like(conv(x), dtype=torch.float64)
    xx, xs, yx, n = pg.normal_sums(conv, x, y)
    rows = pg.unfolded_rows(conv, x).double()
    targets = y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    assert n == rows.shape[0]
    torch.testing.assert_close(yx, targets.T @ rows, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(xx, rows.T @ rows, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(xs, rows.sum(0), rtol=1e-12, atol=1e-10)


def test_normal_sums_rejects_what_it_cannot_do() -> None:
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(ValueError, match="shifted windows serve"):
        pg.normal_sums(nn.Conv2d(3, 2, 1, stride=2), x, torch.zeros(2, 2, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="does not match"):
        pg.normal_sums(nn.Conv2d(3, 2, 3, padding=1), x, torch.zeros(2, 5, 6, 6, dtype=torch.float64))


def test_strided_convs_take_the_phases_only_where_products_are_shared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 3×3 stride-2 conv shares row products between offset pairs (34 groups for 45 pairs); a 1×1 or
    2×2 stride-2 one shares none; small work keeps the unfolded rows."""
    monkeypatch.setattr(pg, "STRIDED_MIN_WORK", 2**21)
    x = torch.randn(500, 16, 28, 28)
    assert len(pg._offset_pairs(nn.Conv2d(16, 8, 3, 2, 1))) == 34
    assert pg.shifted_sums_apply(nn.Conv2d(16, 8, 3, 2, 1), x)  # 500·14² rows × 16² ≥ 2²¹
    assert not pg.shifted_sums_apply(nn.Conv2d(16, 8, 1, 2), x)
    assert not pg.shifted_sums_apply(nn.Conv2d(16, 8, 2, 2), x)
    small = torch.randn(16, 3, 64, 64)  # a 7×7 stride-2 stem on 64 px: 16·32² rows × 3²
    assert not pg.shifted_sums_apply(nn.Conv2d(3, 8, 7, 2, 3), small)
    assert pg.shifted_sums_apply(nn.Conv2d(3, 8, 7, 2, 3), small, parts=16)  # × (16·3)² joint channels
