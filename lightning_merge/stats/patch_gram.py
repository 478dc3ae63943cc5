"""XᵀX of a layer's input rows without forming all the rows: the shared kernel of RegMean's Gram
statistics, K-FAC's input factor and PLeaS' least-squares refit.

A Linear layer's rows are its inputs' last axis; a Conv2d's are the unfolded (C·kh·kw) patches of
every output position, in ``weight.flatten(1)`` order. For a stride-1 convolution the block of XᵀX
between kernel offsets p and q is a sum over a window of the per-position products
x[u]·x[u+δ]ᵀ (δ = q − p), and the window is the same rectangle shifted by p. So one batched product
per *distinct* non-negative offset difference serves every (p, q) pair: 13 products instead of the 81
(or 45 using symmetry) C×C blocks of a 3×3 kernel. The input is laid out once as (Hp, Wp, B, C), so a
row's column range is a contiguous (width·B, C) matrix and an offset difference's row products are one
batched product of strided views (each a long GEMM, no patch copied); a window is the sum of its rows
minus its missing edge columns. With zero padding, positions in the padding ring are skipped (their
products are zero). The batched product sums in another order than one product per row did: the sums
moved by ≤ 5e-16 relative (measured on ResNet-20 shapes), inside the 1e-12 the tests hold them to.
A stride-s conv is the same sum over the input's s_h·s_w phases (the positions ≡ r mod s, each a
contiguous tensor): offset a reads phase a mod s at shift a // s, so the pairs (p, q) with the same
two phases and the same shift difference share one set of row products (34 groups for the 45 pairs
of a 3×3 stride-2 kernel, 290 for the 1225 of a 7×7 one) and no patch is formed: 1.9× faster than
the unfolded rows on ResNet-20's stride-2 convs, 1.1–2.1× on ResNet-18's (2 threads,
``benchmarks/results/patch_gram_strided.md``; the sums equal to 1.4e-15 relative). 1×1 and
non-overlapping strided kernels share nothing and, like grouped convs and small inputs, take
unfolded rows and a block-upper-triangle product.

The sums are float64, because they feed ill-conditioned solves. The products that feed them run in
``products`` precision (default float64): float32 products of float32 activations (as precise as
the activations themselves) are about 2× faster on CPU; each product spans at most one image row's
columns of a chunk (or :data:`SYM_ROWS` rows) before it is added in float64.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: Bytes of float64 input copied at once: the batch is processed in chunks of images that fit.
CHUNK_BYTES = 256 * 2**20
#: Fewest rows (images × output positions) for the shifted products: below it their per-row
#: overhead loses to one product of the unfolded rows (measured: 0.4× at 128 rows, 1.8× at 1280,
#: 3–6× at 32 000+).
SHIFT_MIN_ROWS = 1024
#: Least rows × (joint channels)² for a strided conv's shifted products: below it the per-group
#: products are too small and one product of the unfolded rows wins (measured, 2 threads: a 7×7 stride-2
#: stem on 3+3 channels, 16 images of 64 px (0.6 M): 0.7×; at 224 px, 8 images (3.6 M): 2.1×;
#: a 3×3 stride-2 conv on 4+4 channels, 500 images of 28 px (6 M): 1.3×; on 16+16 channels: 1.9×).
STRIDED_MIN_WORK = 2**21
#: Column block of :func:`sym_gram`; narrower matrices take one plain product.
SYM_BLOCK = 768
#: Rows per product of :func:`sym_gram` in a precision below float64 (then summed in float64).
SYM_ROWS = 8192


def sym_gram(rows: torch.Tensor, products: torch.dtype = torch.float64) -> torch.Tensor:
    """rowsᵀ·rows in float64, computing only the block upper triangle (≈ half the work when wide);
    below float64, products over slabs of :data:`SYM_ROWS` rows are summed in float64."""
    if products != torch.float64:
        out = rows.new_zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
        for start in range(0, rows.shape[0], SYM_ROWS):
            out += _sym_gram(rows[start : start + SYM_ROWS].to(products))
        return out
    return _sym_gram(rows.to(torch.float64))


def _sym_gram(rows: torch.Tensor) -> torch.Tensor:
    d = rows.shape[1]
    if d <= SYM_BLOCK:
        return (rows.T @ rows).to(torch.float64)
    out = rows.new_empty(d, d, dtype=torch.float64)
    spans = list(itertools.pairwise([*range(0, d, SYM_BLOCK), d]))
    for i, (a0, a1) in enumerate(spans):
        for b0, b1 in spans[i:]:
            block = rows[:, a0:a1].T @ rows[:, b0:b1]
            out[a0:a1, b0:b1] = block
            if b0 != a0:
                out[b0:b1, a0:a1] = block.T
    return out


def _padded(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Input padded like ``Conv2d._conv_forward`` and the (h0, h1, w0, w1) box that can be non-zero."""
    left, right, top, bottom = conv._reversed_padding_repeated_twice
    h, w = x.shape[-2:]
    if not any((left, right, top, bottom)):
        return x, (0, h, 0, w)
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, (left, right, top, bottom), mode=mode)
    if conv.padding_mode == "zeros":
        return xp, (top, top + h, left, left + w)
    return xp, (0, xp.shape[-2], 0, xp.shape[-1])


def _position_major(
    conv: nn.Conv2d, parts: Sequence[torch.Tensor], dtype: torch.dtype
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The parts side by side along channels, padded, as one (Hp, Wp, B, C) ``dtype`` tensor, and the
    box that can be non-zero (as :func:`_padded`).

    With zero padding each part is written straight into its channel slice of the interior (one
    copy that also converts the dtype) and only the padding ring is zeroed; joining, converting,
    padding and transposing one after the other cost four copies, a third of the shifted sums' time
    on ResNet-20 (profiled)."""
    if conv.padding_mode != "zeros":
        xp, live = _padded(conv, torch.cat([p.to(dtype) for p in parts], 1))
        return xp.permute(2, 3, 0, 1).contiguous(), live
    left, right, top, bottom = conv._reversed_padding_repeated_twice
    (b, _, h, w), c = parts[0].shape, sum(p.shape[1] for p in parts)
    xt = parts[0].new_empty(top + h + bottom, left + w + right, b, c, dtype=dtype)
    for ring in (xt[:top], xt[top + h :], xt[top : top + h, :left], xt[top : top + h, left + w :]):
        ring.zero_()
    c0 = 0
    for p in parts:
        xt[top : top + h, left : left + w, :, c0 : c0 + p.shape[1]].copy_(p.permute(2, 3, 0, 1))
        c0 += p.shape[1]
    return xt, (top, top + h, left, left + w)


def unfolded_rows(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Conv input as (B·Ho·Wo, C·kh·kw) rows in ``weight.flatten(1)`` order (strided views, one copy)."""
    (sh, sw), (dh, dw), (kh, kw) = conv.stride, conv.dilation, conv.kernel_size
    xp, _ = _padded(conv, x)
    p = xp.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]
    return p.permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kh * kw)


class _Phase:
    """One phase of a strided conv's padded input: the positions (s_h·i + r_h, s_w·j + r_w) as a
    contiguous (H', W', B, C) tensor, and the box of it that can be non-zero. A kernel offset a reads
    phase a mod s at shift a // s, so a stride-s conv is a stride-1 window sum over its phases."""

    def __init__(
        self, xt: torch.Tensor, live: tuple[int, int, int, int], r: tuple[int, int], s: tuple[int, int]
    ) -> None:
        (rh, rw), (sh, sw), (h0, h1, w0, w1) = r, s, live
        self.x = xt if s == (1, 1) else xt[rh::sh, rw::sw].contiguous()
        # the live box [h0, h1) in phase rows: i with s·i + r in it, i.e. [⌈(h0 − r)/s⌉, ⌈(h1 − r)/s⌉)
        self.live = (-((rh - h0) // sh), -((rh - h1) // sh), -((rw - w0) // sw), -((rw - w1) // sw))
        self.x64: torch.Tensor | None = None

    def float64(self) -> torch.Tensor:
        if self.x64 is None:
            self.x64 = self.x.to(torch.float64)
        return self.x64


def _kernel_offsets(conv: nn.Conv2d) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Per kernel offset (weight.flatten(1) order): its phase (a mod s) and its shift (a // s)."""
    return _geometry_offsets(conv.kernel_size, conv.dilation, conv.stride)


@functools.cache
def _geometry_offsets(
    kernel: tuple[int, int], dilation: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    (kh, kw), (dh, dw), (sh, sw) = kernel, dilation, stride
    return [((a * dh % sh, b * dw % sw), (a * dh // sh, b * dw // sw)) for a in range(kh) for b in range(kw)]


def _offset_pairs(conv: nn.Conv2d) -> dict[tuple, list[tuple[int, int]]]:
    """Kernel-offset index pairs p ≤ q grouped by (phase of p, phase of q, shift(q) − shift(p)): one
    set of row products serves each group (stride 1: one phase, so by the offset difference)."""
    return _geometry_pairs(conv.kernel_size, conv.dilation, conv.stride)


@functools.cache
def _geometry_pairs(
    kernel: tuple[int, int], dilation: tuple[int, int], stride: tuple[int, int]
) -> dict[tuple, list[tuple[int, int]]]:
    offsets = _geometry_offsets(kernel, dilation, stride)
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for p, (rp, (pa, pb)) in enumerate(offsets):
        for q in range(p, len(offsets)):
            rq, (qa, qb) = offsets[q]
            groups.setdefault((rp, rq, (qa - pa, qb - pb)), []).append((p, q))
    return groups


def _row_products(
    left: torch.Tensor, right: torch.Tensor, delta: tuple[int, int], rows: range, c0: int, c1: int
) -> torch.Tensor:
    """For each row h: Σ over columns w in [c0, c1) and the batch of left[h, w]·right[(h, w) + δ]ᵀ.

    Both are (H, W, B, C), so each row's column range is one contiguous (n·B, C) matrix: the rows
    are one batched product of strided views, each a GEMM with a long inner dimension, and no patch
    is copied."""
    da, db = delta
    c = left.shape[-1]
    lhs = left[rows.start : rows.stop, c0:c1].reshape(len(rows), -1, c)
    rhs = right[rows.start + da : rows.stop + da, c0 + db : c1 + db].reshape(len(rows), -1, c)
    return torch.bmm(lhs.transpose(1, 2), rhs)


def _delta_blocks(
    left: _Phase, right: _Phase, delta: tuple[int, int], starts: list[tuple[int, int]], out: tuple[int, int]
) -> list[torch.Tensor]:
    """The XᵀX blocks of the offset pairs (p, q) of one group, whose first offsets read ``left`` at
    the shifts ``starts`` and second ones ``right`` at those shifts + δ.

    Block p is the sum of l[u]·r[u+δ]ᵀ over the window u ∈ p + [0, Ho)×[0, Wo), clipped to where both
    factors can be non-zero. All windows share one product per row over the widest column range;
    each window then drops its rows outside, and subtracts its missing edge columns (a column or two,
    cached per range) instead of forming its own product."""
    (da, db), (ho, wo) = delta, out
    (lh0, lh1, lw0, lw1), (rh0, rh1, rw0, rw1) = left.live, right.live
    h0, h1 = max(lh0, rh0 - da, min(a for a, _ in starts)), min(lh1, rh1 - da, max(a for a, _ in starts) + ho)
    w0, w1 = max(lw0, rw0 - db, min(b for _, b in starts)), min(lw1, rw1 - db, max(b for _, b in starts) + wo)
    c = left.x.shape[-1]
    if h0 >= h1 or w0 >= w1:
        return [left.x.new_zeros(c, c, dtype=torch.float64) for _ in starts]
    full = _row_products(left.x, right.x, delta, range(h0, h1), w0, w1).to(torch.float64)
    edges: dict[tuple[int, int], torch.Tensor] = {}
    blocks = []
    for pa, pb in starts:
        r0, r1 = max(pa, h0) - h0, min(pa + ho, h1) - h0
        c0, c1 = max(pb, w0), min(pb + wo, w1)
        if r0 >= r1 or c0 >= c1:
            blocks.append(left.x.new_zeros(c, c, dtype=torch.float64))
            continue
        per_row = full[r0:r1]
        for lo, hi in ((w0, c0), (c1, w1)):
            if lo < hi:
                if (lo, hi) not in edges:
                    edges[lo, hi] = _row_products(left.x, right.x, delta, range(h0, h1), lo, hi).to(
                        torch.float64
                    )
                per_row = per_row - edges[lo, hi][r0:r1]
        blocks.append(per_row.sum(0))
    return blocks


def _cross(phases: dict[tuple[int, int], _Phase], yt: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """YᵀX as (O, C, K): for offset p, Σ over output positions u and the batch of y[u]·x[s·u + p]ᵀ.

    ``yt`` is (Ho, Wo, B, O) and each phase (H', W', B, C): offset p's input window, row by row, is a
    view of its phase whose (Wo, B) axes flatten without a copy, so each offset is one batched product."""
    ho, wo, _, o = yt.shape
    offsets = _kernel_offsets(conv)
    c = next(iter(phases.values())).x.shape[-1]
    ys = yt.reshape(ho, -1, o).transpose(1, 2)  # (Ho, O, Wo·B)
    out = yt.new_empty(o, c, len(offsets))
    for k, (r, (a, b)) in enumerate(offsets):
        xt = phases[r].float64()
        out[:, :, k] = torch.bmm(ys, xt[a : a + ho, b : b + wo].reshape(ho, -1, c)).sum(0)
    return out


def _phases(
    conv: nn.Conv2d, xt: torch.Tensor, live: tuple[int, int, int, int]
) -> dict[tuple[int, int], _Phase]:
    """The phases the kernel offsets read (stride 1: the input itself, no copy)."""
    return {r: _Phase(xt, live, r, conv.stride) for r, _ in _kernel_offsets(conv)}


def _output_size(conv: nn.Conv2d, padded_h: int, padded_w: int) -> tuple[int, int]:
    """(Ho, Wo) of ``conv`` on an input of this size after its padding."""
    (kh, kw), (dh, dw), (sh, sw) = conv.kernel_size, conv.dilation, conv.stride
    return (padded_h - (kh - 1) * dh - 1) // sh + 1, (padded_w - (kw - 1) * dw - 1) // sw + 1


def _shift_sums(
    conv: nn.Conv2d,
    parts: Sequence[torch.Tensor],
    y: torch.Tensor | None,
    products: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """XᵀX, Σx (and YᵀX for a target ``y`` of the conv's output shape) of an ungrouped conv's patches
    of the ``parts`` side by side along channels, from one set of row products per group of offset
    pairs (:func:`_offset_pairs`); no patch is materialised. XᵀX's products run in ``products``
    precision; the sums (and Σx, YᵀX) are float64."""
    offsets = _kernel_offsets(conv)
    k, c, n = len(offsets), sum(p.shape[1] for p in parts), parts[0].shape[0]
    blocks = parts[0].new_zeros(k, k, c, c, dtype=torch.float64)
    xs = parts[0].new_zeros(c, k, dtype=torch.float64)
    yx = None if y is None else parts[0].new_zeros(y.shape[1], c, k, dtype=torch.float64)
    copies = 2 if conv.stride == (1, 1) else 3  # padded input (≤ 2×), and its phases
    chunk = max(1, CHUNK_BYTES // (8 * c * parts[0][0, 0].numel() * copies))  # images per chunk
    for start in range(0, n, chunk):
        xt, live = _position_major(conv, [p[start : start + chunk] for p in parts], products)
        phases, (ho, wo) = _phases(conv, xt, live), _output_size(conv, *xt.shape[:2])
        for (rp, rq, delta), pairs in _offset_pairs(conv).items():
            got = _delta_blocks(phases[rp], phases[rq], delta, [offsets[p][1] for p, _ in pairs], (ho, wo))
            for (p, q), block in zip(pairs, got, strict=True):
                blocks[p, q] += block
        totals = {r: ph.x.sum(2).to(torch.float64) for r, ph in phases.items()}  # products' precision
        xs += torch.stack([totals[r][a : a + ho, b : b + wo].sum((0, 1)) for r, (a, b) in offsets], 1)
        if yx is not None:
            yt = y[start : start + chunk].to(torch.float64).permute(2, 3, 0, 1).contiguous()
            yx += _cross(phases, yt, conv)
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool), 1)
    blocks.transpose(0, 1)[upper] = blocks[upper].transpose(-1, -2)  # (q, p) = (p, q)ᵀ
    xx = blocks.permute(2, 0, 3, 1).reshape(c * k, c * k)  # index c·K + p, as weight.flatten(1)
    return xx, xs.reshape(-1), None if yx is None else yx.reshape(yx.shape[0], -1)


def shifted_sums_apply(layer: nn.Module, x: torch.Tensor, parts: int = 1) -> bool:
    """Whether :func:`input_gram` / :func:`normal_sums` use the shifted products for this input
    (``parts`` inputs of ``x``'s shape side by side). A strided conv takes them only where offset
    pairs share products (not 1×1 or non-overlapping patches) and the work is large enough
    (:data:`STRIDED_MIN_WORK`)."""
    if not isinstance(layer, nn.Conv2d) or layer.groups != 1:
        return False
    rows = x.shape[0] * output_positions(layer, x)
    if rows < SHIFT_MIN_ROWS:
        return False
    if layer.stride == (1, 1):
        return True
    groups = _offset_pairs(layer)
    shared = len(groups) < sum(len(pairs) for pairs in groups.values())
    return shared and rows * (parts * x.shape[1]) ** 2 >= STRIDED_MIN_WORK


def normal_sums(
    conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(XᵀX, Σx, YᵀX, rows) of a conv's patches X and a target Y of its output's shape, float64; for
    least squares (needs :func:`shifted_sums_apply`)."""
    if not shifted_sums_apply(conv, x):
        raise ValueError(
            "normal_sums needs an ungrouped Conv2d input that the shifted windows serve (shifted_sums_apply)"
        )
    if y.shape[0] != x.shape[0] or y.shape[1] != conv.out_channels:
        raise ValueError(
            f"target of shape {tuple(y.shape)} does not match the conv's output for {tuple(x.shape)}"
        )
    xx, xs, yx = _shift_sums(conv, [x], y)
    return xx, xs, yx, x.shape[0] * output_positions(conv, x)


def input_gram(
    layer: nn.Module,
    x: torch.Tensor | Sequence[torch.Tensor],
    products: torch.dtype = torch.float64,
    where: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(XᵀX, Σx, number of rows) of ``layer``'s input rows, float64 (no bias column); the products
    of XᵀX in ``products`` precision (see the module docstring). ``x`` may be several inputs of one
    shape, taken side by side along the channel (conv) / feature (Linear) axis: the N models' joint
    input, which the shifted path then never joins into one tensor. ``where`` names the layer in the
    error about inputs of other shapes."""
    if products not in (torch.float32, torch.float64):
        raise ValueError(f"products must be torch.float32 or torch.float64, got {products}")
    parts = [x] if isinstance(x, torch.Tensor) else list(x)
    check_same_shape(parts, where or "one " + type(layer).__name__)
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError(f"input_gram needs an ungrouped Conv2d, got groups={layer.groups}")
        if shifted_sums_apply(layer, parts[0], len(parts)):
            xx, xs, _ = _shift_sums(layer, parts, None, products)
            return xx, xs, parts[0].shape[0] * output_positions(layer, parts[0])
        rows = unfolded_rows(layer, _joined(parts, 1))
    elif isinstance(layer, nn.Linear):
        rows = linear_rows(parts)
    else:
        raise TypeError(f"input_gram supports Linear and Conv2d layers, got {type(layer).__name__}")
    return sym_gram(rows, products), rows.sum(0, dtype=torch.float64), rows.shape[0]


def check_same_shape(parts: Sequence[torch.Tensor], where: str) -> None:
    """Several models' inputs to one layer must have one shape (``where`` names the layer)."""
    shapes = [tuple(p.shape) for p in parts]
    if len(set(shapes)) != 1:
        raise ValueError(f"the inputs to {where} differ in shape: {shapes}")


def linear_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """A Linear's input rows (rows, Σ d), the inputs side by side along the features."""
    rows = _joined(list(parts), -1)
    return rows.reshape(-1, rows.shape[-1])


def _joined(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def output_positions(conv: nn.Conv2d, x: torch.Tensor) -> int:
    pad = conv._reversed_padding_repeated_twice
    ho, wo = _output_size(conv, x.shape[-2] + sum(pad[2:]), x.shape[-1] + sum(pad[:2]))
    return ho * wo


def with_bias_column(layer: nn.Module, xx: torch.Tensor, xs: torch.Tensor, rows: int) -> torch.Tensor:
    """The Gram of the rows with a constant-1 column appended when ``layer`` has a bias:
    [[XᵀX, Σx], [Σxᵀ, n]], so a merge can solve for ``[W | b]`` jointly."""
    if getattr(layer, "bias", None) is None:
        return xx
    count = xx.new_full((1, 1), float(rows))
    return torch.cat([torch.cat([xx, xs[:, None]], 1), torch.cat([xs[None], count], 1)])
