"""Parameters and FLOPs of a model, counted the same way for every model a table compares.

Merges can carry *structural zeros*: rows or blocks of a weight that are exactly zero (a partial zip's
unmerge blocks, a pruned or masked merge, a width-N concatenation written as block-diagonal layers).
Dense counts would charge them as real work, so both counts here take nonzero weights only:

* ``params``: nonzero entries of the parameters;
* ``flops``: :class:`torch.utils.flop_counter.FlopCounterMode`'s count of one forward pass (2 per
  multiply-add of matmuls, convolutions, attention) minus the multiply-adds whose weight operand is an
  exact zero. A weight operand is any tensor sharing storage with a parameter or buffer of the model
  (so ``W.T`` views count); activations' zeros (after a ReLU) are data, not structure, and are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


@dataclass(frozen=True)
class Cost:
    """Nonzero parameters and FLOPs of one forward pass on a single input."""

    params: int
    flops: int

    def relative_to(self, other: Cost) -> tuple[float, float]:
        """``(params, flops)`` as multiples of ``other``'s (e.g. of one source)."""
        if other.params <= 0 or other.flops <= 0:
            raise ValueError(f"cannot compare with a reference of {other.params} params, {other.flops} FLOPs")
        return self.params / other.params, self.flops / other.flops


def count_params(module: nn.Module) -> int:
    """Nonzero entries of ``module``'s parameters (shared parameters once)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"count_params needs an nn.Module, got {type(module).__name__}")
    return int(sum(int(torch.count_nonzero(p)) for p in module.parameters()))


class _ZeroWeightFlops(TorchDispatchMode):
    """FLOPs that matmuls and convolutions spend on exact-zero entries of a weight operand."""

    def __init__(self, weight_storages: set[int]) -> None:
        super().__init__()
        self.storages, self.saved = weight_storages, 0

    def _is_weight(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.storages

    def _zeros(self, t: torch.Tensor) -> int:
        return t.numel() - int(torch.count_nonzero(t))

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in (aten.mm.default, aten.addmm.default):
            a, b = args[-2], args[-1]
            if self._is_weight(b):  # x @ W.T: every zero of W skips one multiply-add per row of x
                self.saved += 2 * a.shape[0] * self._zeros(b)
            elif self._is_weight(a):
                self.saved += 2 * b.shape[1] * self._zeros(a)
        elif func is aten.convolution.default and self._is_weight(args[1]):
            transposed = bool(args[6])
            grid = args[0] if transposed else out  # the positions each kernel entry is applied at
            positions = grid.shape[0] * (grid[0, 0].numel() if grid.dim() > 2 else 1)
            self.saved += 2 * positions * self._zeros(args[1])
        return out


@torch.no_grad()
def count_flops(module: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass of ``module`` (eval mode) on one input of ``input_shape`` (no batch axis),
    nonzero weights only. The input is zeros on the module's device."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"count_flops needs an nn.Module, got {type(module).__name__}")
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(
            f"input_shape must list positive sizes (without the batch axis), got {input_shape!r}"
        )
    tensors = [*module.parameters(), *module.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    storages = {t.untyped_storage().data_ptr() for t in tensors}
    was_training = module.training
    module.eval()
    counter, zeros = FlopCounterMode(display=False), _ZeroWeightFlops(storages)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # fused attention kernels are invisible to the counter
    try:
        # inference mode skips the decompositions (aten.linear, aten.conv2d stay whole), so the zero-weight
        # counter would never see the mm / convolution it reads: count in plain no-grad mode instead
        with torch.inference_mode(False), torch.no_grad(), counter, zeros:
            module(torch.zeros(1, *shape, device=device))
    finally:
        module.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return int(counter.get_total_flops()) - zeros.saved


def cost(module: nn.Module, input_shape: Sequence[int]) -> Cost:
    """:class:`Cost` of ``module`` on one input of ``input_shape``."""
    return Cost(count_params(module), count_flops(module, input_shape))
