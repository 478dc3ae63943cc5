"""REPAIR (Jordan et al., 2023): rescale merged features to the statistics their sources had.

Averaging matched weights shrinks the variance of the merged features (the "variance collapse"),
layer after layer. A BatchNorm after the layer undoes that by itself once its statistics are reset
(:func:`~lightning_merge.apply.batchnorm_reset.reset_batchnorm`); a network without normalisation
needs REPAIR: for every Linear / Conv2d whose output is a merge point, the merged channel j should
have the mean and standard deviation of the source channels fused into it,

    μ*_j = Σ_i (M_i μ_i)_j,   σ*_j = Σ_i (M_i σ_i)_j      (M_i: model i's block of the merge matrix),

measured over data (population statistics, float64 sums). The layers are repaired in forward order:
each one's output statistics are pooled over every batch with the layers before it already
repaired, and its affine correction is folded into its weight and bias, so the final model has the
target statistics exactly over that data (a BatchNorm-style pass with batch statistics would only
approximate them). The merged model runs once per batch all the same: its forward resumes layer by
layer (:func:`~lightning_merge.apply.least_squares.layer_runner`, shared with PLeaS' refit). Layers
whose merge point also holds a normalisation layer's parameters are left to the BatchNorm reset.
Across ranks the data are sharded and the sums added as in every pass (:mod:`lightning_merge.dataflow`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from lightning_merge.apply.least_squares import forward_order, layer_runner
from lightning_merge.dataflow import Ranks, all_reduce_sum_, check_max_batches, local_batches, model_device
from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match.transform import SpaceTransform
from lightning_merge.stats.attention import (
    attention_output,
    in_proj_space,
    in_proj_view,
    qkv,
    stacked_block,
)

LAYERS = (nn.Linear, nn.Conv2d)
NORMS = (_NormBase, nn.GroupNorm, nn.LayerNorm)


def _channels_first(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Layer output as (channels, samples) in float64 (conv: every position is a sample)."""
    y = y.detach().to(torch.float64)
    if isinstance(module, nn.Conv2d):
        return y.transpose(0, 1).reshape(y.shape[1], -1)
    return y.reshape(-1, y.shape[-1]).T


def _is_norm_param(model: nn.Module, param: str) -> bool:
    owner = param.rpartition(".")[0]
    try:
        return isinstance(model.get_submodule(owner), NORMS)
    except AttributeError:
        return False


def repair_points(model: nn.Module, graph: MergeGraph) -> dict[str, str]:
    """{layer name: merge point} of the Linear / Conv2d layers of ``model`` that REPAIR rescales.

    A layer qualifies when its whole output axis is one merge point that holds no normalisation
    layer (those are fixed by the BatchNorm reset instead)."""
    out_of: dict[str, str] = {}
    normed: set[str] = set()
    for space in graph.spaces:
        for ref in space.members:
            if _is_norm_param(model, ref.param):
                normed.add(space.name)
            whole = ref.axis == 0 and not ref.offset and ref.outer == 1 and ref.inner == 1
            if ref.role == "out" and whole and ref.param.endswith(".weight"):
                out_of[ref.param.removesuffix(".weight")] = space.name
    points = {
        name: out_of[name]
        for name, module in model.named_modules()
        if isinstance(module, LAYERS) and out_of.get(name) not in (None, *normed)
    }
    for name, module in model.named_modules():  # attention's packed q, k, v rows: one point
        if isinstance(module, nn.MultiheadAttention):
            space = in_proj_space(graph, name)
            if space is not None and space not in normed:
                points[f"{name}.in_proj"] = space
    return points


def _attention_of(model: nn.Module, point: str) -> tuple[nn.MultiheadAttention, str] | None:
    """(attention module, "in_proj" or "out_proj") when ``point`` is one of its projections."""
    owner, _, leaf = point.rpartition(".")
    if leaf not in ("in_proj", "out_proj") or not owner:
        return None
    module = model.get_submodule(owner)
    return (module, leaf) if isinstance(module, nn.MultiheadAttention) else None


def _layer(model: nn.Module, point: str) -> nn.Module:
    """The layer REPAIR folds into: the module, or a Linear view of attention's packed in_proj."""
    attention = _attention_of(model, point)
    if attention is not None and attention[1] == "in_proj":
        return in_proj_view(attention[0])
    return model.get_submodule(point)


def _point_output(model: nn.Module, point: str, x: torch.Tensor) -> torch.Tensor:
    """The point's output from the input of its module (for attention: the attention module's)."""
    attention = _attention_of(model, point)
    if attention is None:
        return model.get_submodule(point)(x)
    mha, leaf = attention
    return qkv(mha, x) if leaf == "in_proj" else attention_output(mha, x)


def _hooked_module(model: nn.Module, point: str) -> str:
    """The module whose call a point's statistics come from (attention's projections: the attention)."""
    return point.rpartition(".")[0] if _attention_of(model, point) is not None else point


class _Sums:
    """float64 per-channel [Σy, Σy², count] of some layers' outputs, all in one flat tensor."""

    def __init__(self, widths: Mapping[str, int], device: torch.device) -> None:
        self.widths = dict(widths)
        self.offsets: dict[str, int] = {}
        total = 0
        for name, c in self.widths.items():
            self.offsets[name] = total
            total += 2 * c + 1
        self.flat = torch.zeros(total, dtype=torch.float64, device=device)

    def add(self, name: str, y: torch.Tensor) -> None:
        o, c = self.offsets[name], self.widths[name]
        self.flat[o : o + c] += y.sum(1)
        self.flat[o + c : o + 2 * c] += (y * y).sum(1)
        self.flat[o + 2 * c] += y.shape[1]

    def all_reduce(self, ranks: Ranks | None) -> None:
        all_reduce_sum_([self.flat], ranks)

    def moments(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, variance) per channel over every sample; the population variance, as BatchNorm
        normalises with."""
        o, c = self.offsets[name], self.widths[name]
        count = self.flat[o + 2 * c]
        mean = self.flat[o : o + c] / count
        return mean, (self.flat[o + c : o + 2 * c] / count - mean * mean).clamp_min(0)


def _source_moments(
    source: nn.Module, names: Sequence[str], batches: Sequence[torch.Tensor], ranks: Ranks | None
) -> _Sums:
    """Output sums of the named layers of one (unchanged) source: one eval-mode pass with hooks."""
    sums = _Sums({n: _layer(source, n).weight.shape[0] for n in names}, model_device(source))

    def attention_hook(n: str):  # noqa: ANN202 — a forward pre-hook on the attention module
        def record(_m: nn.Module, args: tuple) -> None:
            sums.add(n, _channels_first(_layer(source, n), _point_output(source, n, args[0])))

        return record

    def layer_hook(n: str):  # noqa: ANN202 — a forward hook on the layer
        def record(m: nn.Module, _args: tuple, y: torch.Tensor) -> None:
            sums.add(n, _channels_first(m, y))

        return record

    handles = [
        source.get_submodule(_hooked_module(source, n)).register_forward_pre_hook(attention_hook(n))
        if _attention_of(source, n) is not None
        else source.get_submodule(n).register_forward_hook(layer_hook(n))
        for n in names
    ]
    was_training = source.training
    try:
        source.eval()
        with torch.no_grad():
            for x in batches:
                source(x)
    finally:
        for h in handles:
            h.remove()
        source.train(was_training)
    sums.all_reduce(ranks)
    return sums


def _targets(
    points: Mapping[str, str],
    sources: Sequence[nn.Module],
    transforms: Mapping[str, SpaceTransform],
    batches: Sequence[torch.Tensor],
    ranks: Ranks | None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(μ*, σ*) per layer: each source's channel mean and std mapped through its merge block."""
    per_source = [_source_moments(s, list(points), batches, ranks) for s in sources]
    targets = {}
    for name, space in points.items():
        moments = [s.moments(name) for s in per_source]
        channels = moments[0][0].shape[0]
        blocks = [
            stacked_block(transforms[space].merge_block(i), channels).to(torch.float64)
            for i in range(len(sources))
        ]
        mean = sum(m @ mu for m, (mu, _) in zip(blocks, moments, strict=True))
        std = sum(m @ var.sqrt() for m, (_, var) in zip(blocks, moments, strict=True))
        targets[name] = (mean, std)
    return targets


def _affine(
    mean: torch.Tensor, var: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor], eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) taking channels of this mean / variance to the target mean / std."""
    scale = target[1] / (var + eps).sqrt()
    return scale, target[0] - mean * scale


def _fold(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """y ↦ scale·y + shift per output channel, folded into the layer's weight and bias."""
    w, b = module.weight, module.bias
    w.copy_((w.to(torch.float64) * scale.reshape(-1, *[1] * (w.dim() - 1))).to(w.dtype))
    b.copy_((b.to(torch.float64) * scale + shift).to(b.dtype))


def repair_rescale(
    merged: nn.Module,
    sources: Sequence[nn.Module],
    graph: MergeGraph,
    transforms: Mapping[str, SpaceTransform],
    data: Iterable[Any],
    *,
    eps: float = 1e-5,
    max_batches: int | None = None,
    ranks: Ranks | None = None,
) -> nn.Module:
    """Rescale ``merged`` in place so every REPAIR point has its sources' merged statistics.

    Returns ``merged``; a model with no such point (every merge point normalised) is unchanged."""
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    check_max_batches(max_batches)
    points = repair_points(merged, graph)
    if not points:
        return merged
    no_bias = [n for n in points if _layer(merged, n).bias is None]
    if no_bias:
        raise ValueError(
            f"REPAIR folds a per-channel shift into the bias, but layers {no_bias} have none (and no "
            "normalisation after them): give them a bias, or use the BatchNorm reset only"
        )
    missing = sorted({s for s in points.values() if s not in transforms})
    if missing:
        raise KeyError(f"REPAIR needs the transforms of merge points {missing}; the method gave none")
    batches = local_batches(data, model_device(merged), ranks, max_batches=max_batches, what="REPAIR")
    targets = _targets(points, sources, transforms, batches, ranks)
    was_training = merged.training
    try:
        merged.eval()
        with torch.no_grad():
            runner = layer_runner(merged, batches)
            for name in forward_order(merged, batches[0]):
                for point in (name, f"{name}.in_proj", f"{name}.out_proj"):
                    if point in points and _hooked_module(merged, point) == name:
                        _rescale_layer(merged, point, name, runner, len(batches), targets[point], eps, ranks)
    finally:
        merged.train(was_training)
    return merged


def _rescale_layer(
    model: nn.Module,
    point: str,
    name: str,
    runner: Any,
    num_batches: int,
    target: tuple[torch.Tensor, torch.Tensor],
    eps: float,
    ranks: Ranks | None,
) -> None:
    """Pooled output statistics of one point (its inputs already repaired upstream), then the fold;
    ``name`` is the module whose input the runner captures (an attention point's attention module)."""
    layer = _layer(model, point)
    sums = _Sums({point: layer.weight.shape[0]}, layer.weight.device)
    for b in range(num_batches):
        y = _point_output(model, point, runner.capture(b, name, output=False))
        sums.add(point, _channels_first(layer, y))
    sums.all_reduce(ranks)
    _fold(layer, *_affine(*sums.moments(point), target, eps))
