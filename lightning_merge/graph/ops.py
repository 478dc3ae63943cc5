"""Handlers for tensor functions and methods (and the pooling / reshape modules).

======================================  =============================================================
op                                      effect on the features
======================================  =============================================================
relu/gelu/silu/tanh/sigmoid/dropout/…   pass through (functional and method forms)
torchvision.ops.stochastic_depth        pass through (drops whole samples, never single channels)
softmax / log_softmax                   pass through (equivariant along any axis)
add/sub/mul/div/pow/maximum/minimum/+=  tensor ∘ tensor joins both spaces (broadcast-aligned);
                                        with a scalar or a size-1 axis: pass through; with a fixed
                                        full-size tensor: the space becomes fixed; with a parameter
                                        (class token, position embedding): its axis joins the space
cat / concat (channel axis)             spaces become segments at offsets
cat / stack (other axis)                joins the operands' spaces
view/reshape/flatten/unflatten/         channel axis followed through the shapes; flatten of (C, H, W)
squeeze/unsqueeze, nn.Flatten           gives ``inner = H*W``; splitting the channel axis (channel
                                        shuffle) or a channel-last flatten fixes its spaces
permute/transpose/t/movedim/swapaxes    the channel axis moves
getitem                                 tuple items; slicing/indexing other axes; indexing or
                                        partially slicing the channel axis fixes the space
split/chunk/tensor_split/unbind         along other axes: every piece keeps the features; along
                                        the channel axis: the space becomes fixed (MaxViT's q/k/v)
mean/sum/amax/amin/std/var              over other axes: pass; over the channel axis: invariant
max/avg/adaptive pooling                pass (error if pooling the channel axis)
expand/contiguous/clone/to/…            pass; size/dim/shape/_assert: no tensor, ignored
======================================  =============================================================
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .handlers import as_layout, passthrough
from .layout import Layout, ParamLayout, index_map, reshape_blocks, reshape_layout
from .registry import register_handler
from .state import Op

_UNARY_FUNCS = [
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.abs, torch.neg,
    torch.sqrt, torch.rsqrt, torch.erf, torch.clamp, torch.clip, torch.square, torch.softmax,
    torch.log_softmax, F.relu, F.relu6, F.gelu, F.silu, F.elu, F.leaky_relu, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.mish, F.softplus, F.sigmoid, F.tanh, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout, F.softmax, F.log_softmax,
]  # fmt: skip
_UNARY_METHODS = [
    "relu", "relu_", "sigmoid", "tanh", "exp", "log", "abs", "neg", "sqrt", "rsqrt", "clamp",
    "clip", "square", "softmax", "log_softmax", "contiguous", "clone", "detach", "to", "float",
    "double", "half", "type_as", "requires_grad_",
]  # fmt: skip
register_handler(*_UNARY_FUNCS, *_UNARY_METHODS)(passthrough)

try:  # torchvision's stochastic depth scales whole samples (or the batch): equivariant per channel
    from torchvision.ops import stochastic_depth as _stochastic_depth
except ImportError:  # pragma: no cover - torchvision is optional
    pass
else:
    register_handler(_stochastic_depth)(passthrough)


def _entries(op: Op) -> list[tuple[Any, torch.Tensor]]:
    """(layout, value) of every tensor argument."""
    pairs = list(zip(op.lay_args, op.args, strict=False))
    pairs += [(op.lay_kwargs.get(k), v) for k, v in op.kwargs.items()]
    return [(lay, val) for lay, val in pairs if isinstance(val, torch.Tensor)]


def join_aligned(op: Op, entries: list[tuple[Any, tuple[int, ...], list[int | None]]], ndim: int) -> Layout:
    """Operands combined position by position: ``entries`` = (layout, shape, output axis of each axis).

    Spaced operands must carry features on the same output axis and are joined; a fixed operand
    with a full-size channel axis fixes the space; a parameter's matching axis joins it.
    """
    spaced = [(lay, dmap) for lay, _, dmap in entries if isinstance(lay, Layout) and not lay.is_fixed]
    if not spaced:
        return Layout.fixed(ndim)
    chans = {dmap[lay.dim] for lay, dmap in spaced}
    if len(chans) != 1:
        raise op.fail(f"operands carry features on different axes {sorted(map(str, chans))}")
    c = chans.pop()
    ref = spaced[0][0]
    for lay, _ in spaced[1:]:
        op.state.join(ref, lay, f"{op.op_name} at node {op.node.name!r}")
    for lay, shape, dmap in entries:
        if isinstance(lay, Layout) and not lay.is_fixed:
            continue
        axis = dmap.index(c) if c in dmap else None
        if axis is None or shape[axis] == 1:
            continue  # broadcast along the features: the same value for every feature
        if isinstance(lay, ParamLayout) and lay.axes[axis] is not None:
            op.state.register_layout(ref, lay.param, lay.axes[axis], "out")
        else:
            op.state.fix(ref)
    return ref.moved(ndim, c)


@register_handler(
    operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, operator.iadd,
    operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum, torch.where, "add", "add_", "sub", "sub_", "mul", "mul_", "div",
    "div_", "pow", "maximum", "minimum", "where",
)  # fmt: skip
def elementwise(op: Op) -> Layout:
    ndim = op.out_shape().__len__()
    entries = [(lay, tuple(v.shape), [d + ndim - v.dim() for d in range(v.dim())]) for lay, v in _entries(op)]
    return join_aligned(op, entries, ndim)


def _cat_parts(op: Op) -> tuple[list, list[torch.Tensor], int]:
    tensors = op.arg(0, "tensors")
    lays = op.lay(0, "tensors")
    dim = op.arg(1, "dim", 0)
    return list(lays), list(tensors), dim


@register_handler(torch.cat, torch.concat, torch.concatenate)
def cat(op: Op) -> Layout:
    lays, tensors, dim = _cat_parts(op)
    ndim = op.out.dim()
    dim %= ndim
    spaced = [lay for lay in lays if isinstance(lay, Layout) and not lay.is_fixed]
    if not any(lay.dim == dim for lay in spaced):
        entries = [(lay, tuple(t.shape), list(range(ndim))) for lay, t in zip(lays, tensors, strict=True)]
        return join_aligned(op, entries, ndim)
    inner = spaced[0].inner
    segs: list[tuple[int, int, int]] = []
    off = 0
    for lay, t in zip(lays, tensors, strict=True):
        if isinstance(lay, Layout) and not lay.is_fixed:
            if lay.dim != dim or lay.inner != inner:
                raise op.fail("concatenated operands carry features on different axes or layouts")
            segs += [(v, off + o, s) for v, o, s in lay.segs]
            off += lay.features
            continue
        if t.shape[dim] % inner:
            raise op.fail(f"a fixed operand of {t.shape[dim]} channels does not fit inner {inner}")
        n = t.shape[dim] // inner
        segs.append((op.state.uf.new_fixed(n), off, n))
        off += n
    return Layout(ndim, dim, tuple(segs), inner)


@register_handler(torch.stack)
def stack(op: Op) -> Layout:
    lays, tensors, dim = _cat_parts(op)
    ndim = op.out.dim()
    dim %= ndim
    entries = []
    for lay, t in zip(lays, tensors, strict=True):
        entries.append((lay, tuple(t.shape), [d + (d >= dim) for d in range(t.dim())]))
    return join_aligned(op, entries, ndim)


def _param_reshape(lay: ParamLayout, s_in: tuple[int, ...], s_out: tuple[int, ...]) -> ParamLayout:
    axes: list[int | None] = [None] * len(s_out)
    for dims_in, dims_out in reshape_blocks(s_in, s_out):
        big_in = [d for d in dims_in if s_in[d] != 1]
        big_out = [d for d in dims_out if s_out[d] != 1]
        if len(big_in) == 1 and len(big_out) == 1:
            axes[big_out[0]] = lay.axes[big_in[0]]
    return ParamLayout(lay.param, tuple(axes))


@register_handler(
    torch.flatten, torch.reshape, torch.unflatten, torch.squeeze, torch.unsqueeze, nn.Flatten,
    nn.Unflatten, "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
    "reshape_as",
)  # fmt: skip
def reshape(op: Op) -> Any:
    x, s_in, s_out = op.lay(0), tuple(op.args[0].shape), op.out_shape()
    if isinstance(x, ParamLayout):
        return _param_reshape(x, s_in, s_out)
    out = reshape_layout(x, s_in, s_out)
    if out is None:
        # The channel axis is split (ShuffleNet's channel shuffle views C as (groups, C/groups) and
        # transposes) or flattened behind another axis: feature f lands at strided or interleaved
        # positions no space can describe. Its spaces stay fixed (never permuted): exact, unaligned.
        op.state.fix(x)
        return Layout.fixed(len(s_out))
    return out


@register_handler(
    torch.permute, torch.transpose, torch.t, torch.movedim, torch.swapaxes, torch.swapdims,
    "permute", "transpose", "t", "movedim", "swapaxes", "swapdims",
)  # fmt: skip
def permute(op: Op) -> Any:
    """Replays the op on a meta tensor whose axis k has size k + 2 to read the axis order."""
    x, ndim = op.lay(0), op.args[0].dim()
    probe = torch.empty([k + 2 for k in range(ndim)], device="meta")
    t = op.node.target
    res = (
        getattr(probe, t)(*op.args[1:], **op.kwargs)
        if isinstance(t, str)
        else t(probe, *op.args[1:], **op.kwargs)
    )
    order = [s - 2 for s in res.shape]
    if isinstance(x, ParamLayout):
        return ParamLayout(x.param, tuple(x.axes[o] for o in order))
    if x.is_fixed:
        return Layout.fixed(ndim)
    return x.moved(ndim, order.index(x.dim))


@register_handler("expand", "expand_as")
def expand(op: Op) -> Any:
    x, ndim = op.lay(0), op.out.dim()
    new = ndim - op.args[0].dim()
    if isinstance(x, ParamLayout):
        return ParamLayout(x.param, (None,) * new + x.axes)
    return x if x.is_fixed and x.ndim == ndim else x.moved(ndim, None if x.is_fixed else x.dim + new)


@register_handler(operator.getitem)
def getitem(op: Op) -> Any:
    src, idx = op.lay(0), op.args[1]
    if isinstance(src, (tuple, list, dict)):
        return src[idx]
    shape, ndim = tuple(op.args[0].shape), op.out.dim()
    m = index_map(shape, idx)
    if isinstance(src, ParamLayout):
        if m is None:
            return Layout.fixed(ndim)
        axes: list[int | None] = [None] * ndim
        for i, (o, whole) in enumerate(m):
            if o is not None:
                axes[o] = src.axes[i] if whole else None
        return ParamLayout(src.param, tuple(axes))
    if src.is_fixed:
        return Layout.fixed(ndim)
    if m is None:
        raise op.fail("advanced (tensor) indexing of a tensor that carries features")
    o, whole = m[src.dim]
    if o is None or not whole:  # picks particular features: they must stay where they are
        op.state.fix(src)
        return Layout.fixed(ndim)
    return src.moved(ndim, o)


def _split_piece(op: Op, dim_index: int, keep_dim: bool) -> Layout | ParamLayout:
    """The layout every piece of a split along one axis has (they all share it)."""
    x, ndim = op.lay(0), op.args[0].dim()
    dim = op.arg(dim_index, "dim", 0) % ndim
    out_ndim = ndim if keep_dim else ndim - 1
    if isinstance(x, ParamLayout):  # a piece is a partial slice of the parameter along ``dim``
        axes = tuple(None if d == dim else a for d, a in enumerate(x.axes))
        return ParamLayout(x.param, axes if keep_dim else axes[:dim] + axes[dim + 1 :])
    if not isinstance(x, Layout) or x.is_fixed:
        return Layout.fixed(out_ndim)
    if dim == x.dim:  # each piece holds particular features (a partial slice): they stay put
        op.state.fix(x)
        return Layout.fixed(out_ndim)
    return x.moved(out_ndim, x.dim if keep_dim else x.dim - (dim < x.dim))


@register_handler(torch.split, torch.chunk, torch.tensor_split, "split", "chunk", "tensor_split")
def split(op: Op) -> tuple[Layout | ParamLayout, ...]:
    """Pieces along another axis keep the features; splitting the channel axis fixes its space."""
    piece = _split_piece(op, 2, keep_dim=True)
    return tuple(piece for _ in op.out)


@register_handler(torch.unbind, "unbind")
def unbind(op: Op) -> tuple[Layout | ParamLayout, ...]:
    """Like :func:`split` into size-1 pieces, with the split axis dropped."""
    piece = _split_piece(op, 1, keep_dim=False)
    return tuple(piece for _ in op.out)


@register_handler(
    torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
    "mean", "sum", "amax", "amin", "std", "var", "logsumexp",
)  # fmt: skip
def reduce(op: Op) -> Layout:
    x, in_ndim, ndim = op.lay(0), op.args[0].dim(), op.out.dim()
    if not isinstance(x, Layout) or x.is_fixed:
        return Layout.fixed(ndim)
    dims = op.arg(1, "dim", None)
    if dims is None or isinstance(dims, bool):
        return Layout.fixed(ndim)  # reduces everything: invariant to any feature permutation
    dims = {d % in_ndim for d in ((dims,) if isinstance(dims, int) else dims)}
    if x.dim in dims:
        return Layout.fixed(ndim)  # a sum over the features does not depend on their order
    keep = ndim == in_ndim
    return x.moved(ndim, x.dim if keep else x.dim - sum(d < x.dim for d in dims))


@register_handler(F.layer_norm)
def functional_layer_norm(op: Op) -> Layout:
    """``F.layer_norm(x, shape, weight, bias)``: over the feature axis, ``weight``/``bias`` join it.

    Normalising over the features is invariant to their order; over other axes the affine
    parameters are per position, not per feature, and stay fixed.
    """
    ndim = op.out.dim()
    x = as_layout(op.lay(0), ndim)
    first = ndim - len(op.arg(1, "normalized_shape"))
    for i, key in ((2, "weight"), (3, "bias")):
        lay = op.lay(i, key)
        if isinstance(lay, Layout) and not lay.is_fixed:
            raise op.fail(f"its {key} argument carries merge-point features")
        if x.is_fixed or x.dim < first or not isinstance(lay, ParamLayout):
            continue
        axis = lay.axes[x.dim - first - (ndim - first - lay.ndim)] if lay.ndim <= ndim - first else None
        if axis is None:
            raise op.fail(f"its {key} parameter {lay.param} does not span the feature axis")
        op.state.register_layout(x, lay.param, axis, "out")
    return x


def _pool(spatial: int):
    def handler(op: Op) -> Any:
        ndim = (op.out[0] if isinstance(op.out, tuple) else op.out).dim()
        x = as_layout(op.lay(0), ndim)
        if not x.is_fixed and x.dim >= ndim - spatial:
            raise op.fail(f"pooling over axis {x.dim}, which carries the features")
        return (x, x) if isinstance(op.out, tuple) else x

    return handler


for _k, _mods, _funcs in [
    (1, (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d),
     (F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d)),
    (2, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d),
     (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d)),
    (3, (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d),
     (F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d)),
]:  # fmt: skip
    register_handler(*_mods, *_funcs)(_pool(_k))
