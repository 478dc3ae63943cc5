"""PLeaS' second step: re-fit each merged layer so it reproduces the (partially) permuted sources.

For every Linear / Conv2d layer of the merged model, in forward order,

    W* = argmin_W ‖W X − Y‖² + ρ‖W‖²,   X: the *merged* model's inputs to the layer (earlier layers
    already re-fitted), Y = M_out · concat(source outputs of the layer) (each source on its own inputs),

so every layer corrects the drift its predecessors left. A layer whose output axis is in no merge
point (the final projection into a fixed space) targets the mean of the sources' outputs. We solve
the normal equations in closed form: XXᵀ and YXᵀ are accumulated in float64 over the loader (conv:
unfolded patches, every output position a row; bias: an appended constant-1 column), then
(XXᵀ + ρ·tr(XXᵀ)/d·I) Wᵀ = (YXᵀ)ᵀ. The official PLeaS code fits the same objective with a few
hundred Adam steps per layer; the closed form is its exact minimiser and much faster.

Cost: one pass over ``data`` per layer (each pass runs the merged model and the sources only up to
that layer, by stopping the forward with an exception in a hook), so a network with L layers costs
about L²/2 layer-forwards per batch — small for the CNNs and MLPs this is used on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_merge.apply.repair import batch_inputs, model_device
from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match.transform import SpaceTransform

SOLVABLE = (nn.Linear, nn.Conv2d)


class _Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is skipped."""


def forward_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the Linear/Conv2d modules of ``model`` in the order a forward pass calls them."""
    order: list[str] = []
    handles = [
        mod.register_forward_pre_hook(
            lambda _m, _a, name=name: order.append(name) if name not in order else None
        )
        for name, mod in model.named_modules()
        if isinstance(mod, SOLVABLE)
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order


def _rows_in(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Layer input as a (samples, d) matrix matching ``weight.flatten(1)`` (+1 column for the bias)."""
    if isinstance(layer, nn.Conv2d):
        x = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (B, d, L)
        x = x.transpose(1, 2).reshape(-1, x.shape[1])
    else:
        x = x.reshape(-1, x.shape[-1])
    x = x.to(torch.float64)
    if layer.bias is not None:
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
    return x


def _rows_out(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1]).to(torch.float64)
    return y.reshape(-1, y.shape[-1]).to(torch.float64)


def _capture(model: nn.Module, name: str, x: torch.Tensor, *, output: bool) -> torch.Tensor:
    """Run ``model`` on ``x`` until module ``name`` and return its input (or output)."""
    box: list[torch.Tensor] = []

    def pre(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        box.append(args[0])
        raise _Stop

    def post(_m: nn.Module, _a: Any, out: torch.Tensor) -> None:
        box.append(out)
        raise _Stop

    mod = model.get_submodule(name)
    handle = mod.register_forward_hook(post) if output else mod.register_forward_pre_hook(pre)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError(f"module {name!r} was not called during the forward pass")
    return box[0]


def _out_space(graph: MergeGraph, name: str) -> str | None:
    for space in graph.spaces:
        for ref in space.members:
            if ref.param == f"{name}.weight" and ref.role == "out":
                if ref.axis != 0 or ref.offset or ref.outer != 1 or ref.inner != 1:
                    raise ValueError(
                        f"least squares expects {name}.weight axis 0 to be all of {space.name!r}"
                    )
                return space.name
    return None


def _check_layer(name: str, layer: nn.Module) -> None:
    if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"):
        raise ValueError(f"least squares supports Conv2d with groups=1 and zero padding; {name!r} is not")


def solve_layer(
    merged: nn.Module,
    sources: Sequence[nn.Module],
    name: str,
    merge_blocks: Sequence[torch.Tensor] | None,
    data: Iterable[Any],
    *,
    ridge: float,
    max_batches: int | None,
) -> int:
    """Re-fit layer ``name`` of ``merged`` in place; returns the number of rows it was fitted on."""
    layer = merged.get_submodule(name)
    _check_layer(name, layer)
    device, seen, rows = model_device(merged), 0, 0
    xx = yx = None
    for batch in data:
        if max_batches is not None and seen >= max_batches:
            break
        inputs = batch_inputs(batch).to(device)
        x = _rows_in(layer, _capture(merged, name, inputs, output=False))
        ys = [_rows_out(layer, _capture(s, name, inputs, output=True)) for s in sources]
        if merge_blocks is None:
            y = torch.stack(ys).mean(0)
        else:
            y = sum(yi @ mi.T for yi, mi in zip(ys, merge_blocks, strict=True))
        xx = x.T @ x if xx is None else xx.addmm_(x.T, x)
        yx = y.T @ x if yx is None else yx.addmm_(y.T, x)
        seen, rows = seen + 1, rows + x.shape[0]
    if xx is None or yx is None:
        raise ValueError(
            f"least squares for layer {name!r} got no batches: pass a non-empty, re-iterable loader "
            "(a DataLoader or list; it is read once per layer)"
        )
    d = xx.shape[0]
    reg = ridge * float(xx.diagonal().mean().clamp_min(1e-12))
    sol = torch.linalg.solve(xx + reg * torch.eye(d, dtype=xx.dtype, device=xx.device), yx.T).T  # (out, d)
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.copy_(sol[:, -1].to(layer.bias.dtype))
            sol = sol[:, :-1]
        layer.weight.copy_(sol.reshape(layer.weight.shape).to(layer.weight.dtype))
    return rows


def least_squares_refit(
    merged: nn.Module,
    sources: Sequence[nn.Module],
    graph: MergeGraph,
    transforms: Mapping[str, SpaceTransform],
    data: Iterable[Any],
    *,
    ridge: float = 1e-4,
    max_batches: int | None = None,
) -> nn.Module:
    """Re-fit every Linear/Conv2d of ``merged`` in forward order (in place; eval mode during the fit)."""
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    first = next(iter(data), None)
    if first is None:
        raise ValueError("least squares got an empty data loader")
    example = batch_inputs(first).to(model_device(merged))
    modes = [merged.training] + [s.training for s in sources]
    merged.eval()
    for s in sources:
        s.eval()
    try:
        with torch.no_grad():
            for name in forward_order(merged, example):
                space = _out_space(graph, name)
                blocks = None
                if space is not None:
                    t = transforms[space]
                    blocks = [t.merge_block(i).to(torch.float64) for i in range(len(sources))]
                solve_layer(merged, sources, name, blocks, data, ridge=ridge, max_batches=max_batches)
    finally:
        merged.train(modes[0])
        for s, mode in zip(sources, modes[1:], strict=True):
            s.train(mode)
    return merged
