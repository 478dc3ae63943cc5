"""joint_inputs' precision: float64 sums always; products in the sources' precision (at least
``MIN_PRODUCTS``), so float64 sources get exactly the float64 statistic and float32 sources a float32
product of their float32 activations (close to it, not equal)."""

from __future__ import annotations

import copy

import pytest
import torch
from stats_nets import ConvNet, conv_graph, make_models

from lightning_merge.stats import joint_inputs as ji
from lightning_merge.stats import patch_gram as pg
from lightning_merge.stats.collect import collect_statistics


def joint(models: list, batches: list, products: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setattr(ji, "MIN_PRODUCTS", products)
    monkeypatch.setattr(pg, "SHIFT_MIN_ROWS", 1)  # the tiny inputs take the shifted products too
    graph = conv_graph(models[0])
    return collect_statistics(models, graph, batches, requires=["joint_inputs"], progress=False).joint_inputs


def data(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(16, 1, 6, 6, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3)]


def test_float64_sources_keep_float64_products(monkeypatch: pytest.MonkeyPatch) -> None:
    models = [m.double() for m in make_models(ConvNet)]
    a = joint(models, data(torch.float64), torch.float32, monkeypatch)
    b = joint([copy.deepcopy(m) for m in models], data(torch.float64), torch.float64, monkeypatch)
    assert set(a) == {"conv1", "conv2", "fc"}
    for name in a:
        assert a[name].outer.dtype == torch.float64
        assert torch.equal(a[name].outer, b[name].outer) and torch.equal(a[name].total, b[name].total)


def test_float32_sources_take_float32_products_close_to_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    models = make_models(ConvNet)
    low = joint(models, data(torch.float32), torch.float32, monkeypatch)
    high = joint(models, data(torch.float32), torch.float64, monkeypatch)
    differ = False
    for name in low:
        assert low[name].outer.dtype == torch.float64 and torch.equal(low[name].count, high[name].count)
        scale = high[name].outer.abs().max()
        assert (low[name].outer - high[name].outer).abs().max() <= 1e-6 * scale, name
        assert (low[name].total - high[name].total).abs().max() <= 1e-6 * high[name].total.abs().max()
        differ |= not torch.equal(low[name].outer, high[name].outer)
    assert differ  # the products really ran in float32


def test_sym_gram_slabs_add_up_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = torch.randn(1000, 7)
    monkeypatch.setattr(pg, "SYM_ROWS", 64)
    got = pg.sym_gram(rows, torch.float32)
    want = rows.double().T @ rows.double()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_other_product_precisions_are_refused() -> None:
    with pytest.raises(ValueError, match="must be torch.float32 or torch.float64.*float16"):
        pg.input_gram(torch.nn.Linear(3, 2), torch.randn(4, 3), torch.float16)


def test_sources_whose_inputs_differ_in_shape_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same layer names, other shapes (model 1's conv1 strides by 2): the first layer whose inputs
    differ is named, not a shape error from deep inside a product."""
    models = make_models(ConvNet)
    models[1].conv1.stride = (2, 2)
    with pytest.raises(ValueError, match=r"inputs to layer 'conv2' differ in shape"):
        joint(models, data(torch.float32), torch.float64, monkeypatch)
