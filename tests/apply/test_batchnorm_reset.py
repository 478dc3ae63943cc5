"""The BatchNorm reset reads the moments a train-mode BatchNorm computes; these pin what that must keep."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_merge.apply.batchnorm_reset import reset_batchnorm
from lightning_merge.dataflow import Ranks


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4)]
    return nn.Sequential(*layers)


def test_pooled_statistics_of_offset_features_over_unequal_batches_match_float64() -> None:
    """Means 10× the spread, batches of unequal size: pooled to float32 precision (the batch moments
    are the BatchNorm's own float32 ones; at means 1000× the spread the variance is off by ~3e-5)."""
    net = nn.Sequential(nn.Identity(), nn.BatchNorm1d(5))
    g = torch.Generator().manual_seed(1)
    data = [10 + torch.randn(n, 5, generator=g) for n in (7, 64, 2, 33)]
    reset_batchnorm(net, data)
    full = torch.cat(data).double()
    bn = net[1]
    torch.testing.assert_close(bn.running_mean.double(), full.mean(0), rtol=0, atol=2e-6)
    torch.testing.assert_close(bn.running_var.double(), full.var(0), rtol=1e-6, atol=0)
    assert int(bn.num_batches_tracked) == 4 and bn.momentum == 0.1


def test_a_pass_that_raises_leaves_statistics_and_momentum_as_they_were() -> None:
    net = _net()
    net[1].momentum = None
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def batches():
        yield torch.randn(4, 3, 5, 5)
        raise RuntimeError("loader broke")

    with pytest.raises(RuntimeError, match="loader broke"):
        reset_batchnorm(net, batches())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert net[1].momentum is None and net[4].momentum == 0.1
    with pytest.raises(ValueError, match="no batches"):
        reset_batchnorm(net, [])
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


class _Skips(nn.Module):
    """A model with a BatchNorm its forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
        self.unused.running_mean.fill_(7.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_a_batchnorm_no_batch_reaches_keeps_its_statistics() -> None:
    net = _Skips()
    x = torch.randn(16, 3)
    reset_batchnorm(net, [x])
    assert torch.equal(net.unused.running_mean, torch.full((3,), 7.0))
    assert torch.equal(net.unused.running_var, torch.ones(3)) and int(net.unused.num_batches_tracked) == 0
    torch.testing.assert_close(net.used.running_var, x.var(0))


def test_reset_is_independent_of_the_batching_and_of_prior_non_finite_buffers() -> None:
    a, b = _net(), _net()
    b[1].running_var.fill_(float("inf"))
    b[4].running_mean.fill_(float("nan"))
    x = torch.randn(60, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    reset_batchnorm(a, [x[:20], x[20:40], x[40:]])
    reset_batchnorm(b, [x[:50], x[50:]])
    # the first BatchNorm's input does not depend on how the batch is split: pooled equal
    torch.testing.assert_close(a[1].running_mean, b[1].running_mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a[1].running_var, b[1].running_var, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(b[4].running_mean).all() and torch.isfinite(b[4].running_var).all()


def test_sync_batchnorm_on_several_ranks_is_refused_by_name() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.SyncBatchNorm(4))
    with pytest.raises(ValueError, match=r"SyncBatchNorm layers \(1\)"):
        reset_batchnorm(net, [torch.randn(8, 3)], ranks=Ranks(0, 2, reduce_sum=lambda t: t))
