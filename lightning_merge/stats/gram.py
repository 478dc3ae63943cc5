"""Gram matrices XᵀX of every Linear / Conv2d layer's inputs (RegMean, MaTS "regmean" subspace).

Each row of X is one input vector of the layer in the layout of its flattened weight: a Linear sees
its last axis (every leading position is a row), a Conv2d sees the unfolded (C_in·kh·kw) patch of
every output position. A constant-1 column is appended when the layer has a bias, so the merge can
solve for ``[W | b]`` jointly. Sums are float64, formed by :mod:`lightning_merge.stats.patch_gram`
without materialising conv patches (shifted windows; strided convs through the input's phases).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_merge.stats.collector import (
    ForwardCollector,
    SumStates,
    check_per_model,
    check_square,
    split_per_model,
)
from lightning_merge.stats.container import GramStatistics
from lightning_merge.stats.patch_gram import input_gram, with_bias_column
from lightning_merge.stats.registry import register_statistic


def supported_layers(model: nn.Module) -> Iterator[tuple[str, nn.Linear | nn.Conv2d]]:
    """The layers whose weight is one matrix acting on one input vector: Linear and ungrouped Conv2d.

    Grouped / depthwise convolutions act on several independent inputs; methods fall back for them.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1):
            yield name, module


def layer_input_dim(module: nn.Linear | nn.Conv2d) -> int:
    """Width of the augmented input rows: fan-in of the flattened weight, +1 for the bias."""
    return module.weight[0].numel() + (module.bias is not None)


LayerFn = Callable[[int, str, nn.Module, torch.Tensor, torch.Tensor], None]


class _LayerHooks:
    """Forward hooks on every supported layer of N models that call ``fn(i, name, module, x, out)``.

    Hooks only act while :attr:`active` is True, so another collector's forward passes (run in its
    own ``step``) never add to this collector's sums.
    """

    def __init__(self) -> None:
        self.active = False
        self.handles: list[RemovableHandle] = []
        self.layers: list[dict[str, nn.Linear | nn.Conv2d]] = []

    def attach(self, models: Sequence[nn.Module], fn: LayerFn) -> None:
        self.detach()
        self.layers = [dict(supported_layers(m)) for m in models]
        for i, layers in enumerate(self.layers):
            for name, module in layers.items():

                def hook(
                    mod: nn.Module, args: tuple, out: torch.Tensor, i: int = i, name: str = name
                ) -> None:
                    if self.active:
                        fn(i, name, mod, args[0], out)

                self.handles.append(module.register_forward_hook(hook))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


@register_statistic
class GramCollector(ForwardCollector):
    """Accumulates ``grams[i][layer] = Σ x xᵀ`` (augmented rows) and the number of rows per layer.

    Its value is a :class:`GramStatistics`, saved as ``grams/<i>/<layer>`` with the row counts in
    the sidecar.
    """

    name = "grams"

    def __init__(self) -> None:
        self._hooks = _LayerHooks()
        self.grams: list[SumStates] = []
        self.counts: list[SumStates] = []

    def attach(self, models: Sequence[nn.Module]) -> None:
        self._hooks.attach(models, self._accumulate)
        self.grams, self.counts = [], []
        for layers in self._hooks.layers:
            dims = {name: layer_input_dim(module) for name, module in layers.items()}
            device = next(iter(layers.values())).weight.device if layers else None
            self.grams.append(SumStates({name: (d, d) for name, d in dims.items()}, device))
            self.counts.append(SumStates({name: () for name in dims}, device))

    def detach(self) -> None:
        self._hooks.detach()

    def _accumulate(self, i: int, name: str, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        xx, xs, rows = input_gram(module, x.detach())
        self.grams[i].update(name, with_bias_column(module, xx, xs, rows))
        self.counts[i].update(name, rows)

    def begin_batch(self) -> None:
        self._hooks.active = True

    def end_batch(self) -> None:
        self._hooks.active = False

    def states(self) -> list[torch.Tensor]:
        return [t for metric in (*self.grams, *self.counts) for t in metric.states()]

    def result(self) -> GramStatistics:
        return GramStatistics(
            sums=[{k: v.clone() for k, v in g.compute().items()} for g in self.grams],
            counts=[{k: float(v) for k, v in c.compute().items()} for c in self.counts],
        )

    @classmethod
    def to_tensors(cls, value: GramStatistics) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"{i}/{layer}": g for i, per in enumerate(value.sums) for layer, g in per.items()}
        return tensors, {"counts": value.counts}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: Any, num_models: int) -> GramStatistics:
        counts = meta["counts"]
        return GramStatistics(sums=split_per_model(tensors, len(counts)), counts=counts)

    @classmethod
    def check(cls, value: Any, num_models: int) -> None:
        if not isinstance(value, GramStatistics):
            raise ValueError(f"statistics 'grams' is a {type(value).__name__}, expected GramStatistics")
        check_per_model("grams", "grams", value.sums, num_models)
        check_per_model("grams", "gram_counts", value.counts, num_models)
        for i, (sums, counts) in enumerate(zip(value.sums, value.counts, strict=True)):
            if set(sums) != set(counts):
                raise ValueError(
                    f"statistics 'grams' of model {i}: the layers of the Gram matrices {sorted(sums)} and "
                    f"of the row counts {sorted(counts)} differ"
                )
            for layer, g in sums.items():
                check_square("grams", f"of model {i} at layer {layer!r}", g)
