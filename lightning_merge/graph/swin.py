"""Handlers for torchvision's Swin Transformer (v1 and v2): windowed attention and patch merging.

``ShiftedWindowAttention(V2)`` is a leaf. Its packed ``qkv`` Linear reads the residual stream
(``qkv.weight`` axis 1, tapped); each head gets its own space of ``head_dim`` features (q, k and v
rows of ``qkv`` as ``outer=3`` at the head's offset, ``proj.weight`` axis 1 there), so features move
only inside their head and heads never move: the relative position bias (and v2's per-head logit
scale and bias MLP) is indexed by head and stays as it is. Within a head, q, k and v share one
permutation, so q·kᵀ (v2: of the normalised q and k) is unchanged. ``proj`` rows start a new space.

``_patch_merging_pad`` concatenates the four 2×2 neighbours on the channel axis: the input's
segments repeated at offsets 0, C, 2C, 3C (the following LayerNorm and Linear read all four).
"""

from __future__ import annotations

from .handlers import as_layout
from .layout import Layout
from .registry import register_handler
from .spec import AxisRef
from .state import Op

_SWIN = "torchvision.models.swin_transformer"


@register_handler(f"{_SWIN}.ShiftedWindowAttention", f"{_SWIN}.ShiftedWindowAttentionV2")
def shifted_window_attention(op: Op) -> Layout:
    m, ndim = op.module, op.out.dim()
    x = as_layout(op.lay(0), ndim)
    if not x.is_fixed and (x.dim != ndim - 1 or x.inner != 1):
        raise op.fail(f"window attention reads the last axis but the features are on axis {x.dim}")
    c, heads = m.qkv.in_features, m.num_heads
    if m.qkv.out_features != 3 * c or m.proj.in_features != c:
        raise op.fail(f"qkv {tuple(m.qkv.weight.shape)} is not a packed (3·{c}, {c}) projection")
    source = op.node.args[0] if op.node.args else next(iter(op.node.kwargs.values()))
    if not x.is_fixed:
        op.state.register_layout(x, op.param("qkv.weight"), 1, "in")
        op.state.tap(op.name, source, x)
    hd = c // heads
    segs = []
    for h in range(heads):
        var = op.state.new_var(hd, f"{op.name}.head{h}")
        for p in ("qkv.weight", "qkv.bias"):
            if p == "qkv.weight" or m.qkv.bias is not None:
                op.state.register(var, AxisRef(op.param(p), 0, "out", h * hd, outer=3, outer_stride=c))
        op.state.register(var, AxisRef(op.param("proj.weight"), 1, "in", h * hd))
        segs.append((var, h * hd, hd))
    op.state.tap(op.name, source, Layout(ndim, ndim - 1, tuple(segs)), kind="attention")
    out = op.state.new_var(m.proj.out_features, op.name)
    op.state.register(out, AxisRef(op.param("proj.weight"), 0, "out"))
    if m.proj.bias is not None:
        op.state.register(out, AxisRef(op.param("proj.bias"), 0, "out"))
    return Layout(ndim, ndim - 1, ((out, 0, m.proj.out_features),))


def patch_merging_pad(op: Op) -> Layout:
    ndim = op.out.dim()
    x = as_layout(op.lay(0), ndim)
    if x.is_fixed:
        return x
    if x.dim != ndim - 1 or x.inner != 1:
        raise op.fail(f"patch merging concatenates the last axis but the features are on axis {x.dim}")
    n = x.features
    return Layout(ndim, ndim - 1, tuple((v, k * n + o, s) for k in range(4) for v, o, s in x.segs))


try:
    from torchvision.models.swin_transformer import _patch_merging_pad
except ImportError:  # pragma: no cover - torchvision is optional
    pass
else:
    register_handler(_patch_merging_pad)(patch_merging_pad)
