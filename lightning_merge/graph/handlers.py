"""Handlers for ``nn.Module`` leaves: what each layer does to the feature spaces it touches.

====================================  ===============================================================
module                                effect
====================================  ===============================================================
Conv1d/2d/3d (groups=1)               input space -> ``weight`` axis 1 ("in"), tap; new space:
                                      ``weight`` axis 0 + ``bias`` ("out"). Depthwise: keeps the
                                      input space (``weight`` axis 0, ``bias``). Other groups: input
                                      and output fixed (never permuted).
Linear                                same on the last axis (any leading axes); over a non-channel
                                      axis (token mixing) the features pass through untouched.
Embedding                             new space: ``weight`` axis 1 ("out").
BatchNorm1d/2d/3d, InstanceNorm       ``weight``, ``bias``, ``running_mean``, ``running_var`` axis 0
                                      join the input space.
LayerNorm                             affine params join the space when the channel axis is normalised.
GroupNorm                             like BatchNorm; the space keeps groups of C/groups intact.
MultiheadAttention (self-attention)   one attention space (``group_size`` = head dim): in_proj q,k,v
                                      rows (outer=3) and ``out_proj.weight`` axis 1; query space ->
                                      in_proj axis 1; new output space: ``out_proj`` rows + bias.
activations, Dropout, Identity,       features pass through.
Softmax, pooling (not over channels)
Flatten / Unflatten                   see the reshape rule in ``ops.py``.
ClassEmbedding (project head)         its input and output are fixed (never permuted).
====================================  ===============================================================

Add a layer type with one entry: ``@register_handler(MyLayer)`` on ``def fn(op: Op) -> Layout``
(see docs/graph.md).
"""

from __future__ import annotations

from torch import nn

from .layout import Layout, ParamLayout
from .registry import register_handler
from .spec import AxisRef
from .state import Op, fixed_like


def as_layout(x: object, ndim: int) -> Layout:
    """Parameters used as layer inputs are treated as fixed tensors."""
    return x if isinstance(x, Layout) else Layout.fixed(ndim)


def produce(op: Op, size: int, params: tuple[str, ...], dim: int, ndim: int) -> Layout:
    """A new space created by this module: ``params``' axis 0 produce its features."""
    var = op.state.new_var(size, op.name)
    for p in params:
        if getattr(op.module, p, None) is not None:
            op.state.register(var, AxisRef(op.param(p), 0, "out"))
    return Layout(ndim, dim, ((var, 0, size),))


def consume(op: Op, x: Layout, axis: int = 1) -> None:
    """This module's ``weight`` axis ``axis`` reads ``x``'s features; observe them here."""
    if x.is_fixed:
        return
    op.state.register_layout(x, op.param("weight"), axis, "in")
    op.state.tap(op.name, op.node.args[0] if op.node.args else op.node.kwargs.get("input"), x)


@register_handler(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv(op: Op) -> Layout:
    m, ndim = op.module, op.out.dim()
    x = as_layout(op.lay(0), ndim)
    if not x.is_fixed and (x.dim != 1 or x.inner != 1):
        raise op.fail(f"features arrive on axis {x.dim} (inner {x.inner}), convolution reads axis 1")
    if m.groups == 1:
        consume(op, x)
        return produce(op, m.out_channels, ("weight", "bias"), 1, ndim)
    if m.groups == m.in_channels == m.out_channels:  # depthwise: channel c only sees channel c
        for p in ("weight", "bias"):
            if getattr(m, p) is not None and not x.is_fixed:
                op.state.register_layout(x, op.param(p), 0, "out")
        return x
    # Other groups (ResNeXt, RegNet): output channel o reads input group o // (out/groups), so a
    # permutation must move input and output groups together; a space cannot say that. Both sides
    # stay fixed (averaged in place, never permuted): exact, at the cost of no alignment there.
    if not x.is_fixed:
        op.state.fix(x)
    return Layout.fixed(ndim)


@register_handler(nn.Linear)
def linear(op: Op) -> Layout:
    ndim = op.out.dim()
    x = as_layout(op.lay(0), ndim)
    if not x.is_fixed and x.dim != ndim - 1:
        return x  # mixes along another axis (tokens): the features are untouched
    consume(op, x)
    return produce(op, op.module.out_features, ("weight", "bias"), ndim - 1, ndim)


@register_handler(nn.Embedding)
def embedding(op: Op) -> Layout:
    ndim = op.out.dim()
    var = op.state.new_var(op.module.embedding_dim, op.name)
    op.state.register(var, AxisRef(op.param("weight"), 1, "out"))
    return Layout(ndim, ndim - 1, ((var, 0, op.module.embedding_dim),))


def _affine(op: Op, x: Layout, axis: int, names: tuple[str, ...]) -> None:
    for p in names:
        if getattr(op.module, p, None) is not None:
            op.state.register_layout(x, op.param(p), axis, "out")


_BN_PARAMS = ("weight", "bias", "running_mean", "running_var")


@register_handler(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d
)
def batchnorm(op: Op) -> Layout:
    x = as_layout(op.lay(0), op.out.dim())
    if not x.is_fixed and x.dim == 1:
        _affine(op, x, 0, _BN_PARAMS)
    return x  # normalising another axis: per-position parameters stay fixed


@register_handler(nn.LayerNorm)
def layernorm(op: Op) -> Layout:
    ndim = op.out.dim()
    x = as_layout(op.lay(0), ndim)
    first = ndim - len(op.module.normalized_shape)
    if not x.is_fixed and x.dim >= first:
        _affine(op, x, x.dim - first, ("weight", "bias"))
    return x


@register_handler(nn.GroupNorm)
def groupnorm(op: Op) -> Layout:
    m = op.module
    x = as_layout(op.lay(0), op.out.dim())
    if x.is_fixed:
        return x
    if x.dim != 1:
        raise op.fail(f"GroupNorm normalises axis 1 but the features are on axis {x.dim}")
    gs = m.num_channels // m.num_groups
    for var, off, size in x.segs:
        if off % gs or size % gs:
            raise op.fail(f"a space of {size} features at offset {off} straddles groups of {gs}")
        op.state.uf.set_group(var, gs)
    _affine(op, x, 0, ("weight", "bias"))
    return x


@register_handler(nn.MultiheadAttention)
def multihead_attention(op: Op) -> tuple:
    m, ndim = op.module, op.out[0].dim()
    if not m._qkv_same_embed_dim:
        raise op.fail("kdim/vdim differ from embed_dim (separate q/k/v projections)")
    if m.bias_k is not None or m.add_zero_attn:
        raise op.fail("bias_k/bias_v/add_zero_attn are not supported")
    ins = [as_layout(op.lay(i, k), ndim) for i, k in enumerate(("query", "key", "value"))]
    spaced = [x for x in ins if not x.is_fixed]
    for x in spaced:
        if x.dim != ndim - 1:
            raise op.fail(f"attention reads the last axis but features are on axis {x.dim}")
    if len(spaced) < 3:  # in_proj columns read q, k and v alike: a fixed one fixes the others
        for x in spaced:
            op.state.fix(x)
    else:
        for x in spaced[1:]:
            op.state.join(spaced[0], x, f"{op.name} (query/key/value)")
    query_node = op.node.args[0] if op.node.args else op.node.kwargs["query"]
    if spaced:
        op.state.register_layout(ins[0], op.param("in_proj_weight"), 1, "in")
        op.state.tap(op.name, query_node, ins[0])
    e = m.embed_dim
    attn = op.state.new_var(e, f"{op.name}.attn", group_size=e // m.num_heads)
    for p in ("in_proj_weight", "in_proj_bias"):
        if getattr(m, p) is not None:
            op.state.register(attn, AxisRef(op.param(p), 0, "out", outer=3, outer_stride=e))
    op.state.register(attn, AxisRef(op.param("out_proj.weight"), 1, "in"))
    op.state.tap(op.name, query_node, Layout(ndim, ndim - 1, ((attn, 0, e),)), kind="attention")
    out = op.state.new_var(e, op.name)
    op.state.register(out, AxisRef(op.param("out_proj.weight"), 0, "out"))
    if m.out_proj.bias is not None:
        op.state.register(out, AxisRef(op.param("out_proj.bias"), 0, "out"))
    return (Layout(ndim, ndim - 1, ((out, 0, e),)), fixed_like(op.out[1]))


@register_handler("lightning_merge.models.heads.ClassEmbedding")
def class_embedding(op: Op) -> object:
    """A frozen, shared class embedding: its input features must stay where they are."""
    x = op.lay(0)
    if isinstance(x, Layout):
        op.state.fix(x)
    return fixed_like(op.out)


def passthrough(op: Op) -> object:
    """Elementwise or equivariant op: the output carries the first input's features."""
    x = op.lay(0)
    if isinstance(x, ParamLayout) and op.node.op == "call_method" and op.node.target in _KEEP_PARAM:
        return x
    return as_layout(x, op.out.dim())


_KEEP_PARAM = {"contiguous", "clone", "detach", "to", "float", "double", "half", "type_as"}

register_handler(
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.ELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Mish,
    nn.Softplus,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
)(passthrough)
