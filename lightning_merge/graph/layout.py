"""Feature layouts: where merge-point features sit inside one traced tensor.

A :class:`Layout` says which axis of a tensor is its channel axis and which feature variables
(union-find ids) fill it, as segments ``(var, offset, size)`` in feature units; ``inner > 1`` means
each feature occupies ``inner`` consecutive positions (after ``flatten`` of a (C, H, W) map).
A :class:`ParamLayout` is a parameter read with ``get_attr`` (class token, position embedding):
its axes are assigned to a space only when it meets features (``add``, ``cat``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod

Seg = tuple[int, int, int]  # (var, offset, size)


@dataclass(frozen=True)
class Layout:
    """Channel axis ``dim`` (None: no axis carries merge-point features) of an ``ndim`` tensor."""

    ndim: int
    dim: int | None = None
    segs: tuple[Seg, ...] = ()
    inner: int = 1

    @classmethod
    def fixed(cls, ndim: int) -> Layout:
        return cls(ndim=ndim)

    @property
    def is_fixed(self) -> bool:
        return self.dim is None

    @property
    def features(self) -> int:
        return sum(s for _, _, s in self.segs)

    def vars(self) -> list[int]:
        return [v for v, _, _ in self.segs]

    def moved(self, ndim: int, dim: int | None, inner: int | None = None) -> Layout:
        if dim is None:
            return Layout.fixed(ndim)
        return replace(self, ndim=ndim, dim=dim, inner=self.inner if inner is None else inner)


@dataclass(frozen=True)
class ParamLayout:
    """A parameter/buffer tensor; ``axes[d]`` is the parameter axis behind tensor dim ``d``.

    ``None`` marks a dim that is not a whole parameter axis (new, broadcast or partially sliced).
    """

    param: str
    axes: tuple[int | None, ...]

    @property
    def ndim(self) -> int:
        return len(self.axes)


def reshape_blocks(s_in: tuple[int, ...], s_out: tuple[int, ...]) -> list[tuple[range, range]]:
    """Split a reshape into blocks of input dims and output dims with equal products."""
    blocks: list[tuple[range, range]] = []
    i = j = 0
    while i < len(s_in) or j < len(s_out):
        i0, j0 = i, j
        pi = s_in[i] if i < len(s_in) else 1
        pj = s_out[j] if j < len(s_out) else 1
        i, j = min(i + 1, len(s_in)), min(j + 1, len(s_out))
        while pi != pj:
            if pi < pj:
                pi *= s_in[i]
                i += 1
            else:
                pj *= s_out[j]
                j += 1
        blocks.append((range(i0, i), range(j0, j)))
        if i == len(s_in) and j == len(s_out):
            break
    return blocks


def reshape_layout(layout: Layout, s_in: tuple[int, ...], s_out: tuple[int, ...]) -> Layout | None:
    """Layout after any view/reshape/flatten/unflatten/squeeze; None if the channel axis breaks."""
    if layout.is_fixed:
        return Layout.fixed(len(s_out))
    d, feats = layout.dim, layout.features
    for dims_in, dims_out in reshape_blocks(s_in, s_out):
        if d not in dims_in:
            continue
        if prod(s_in[k] for k in dims_in if k < d) != 1:
            return None  # channels are not the slowest axis of the block (channel-last flatten)
        inner_total = layout.inner * prod(s_in[k] for k in dims_in if k > d)
        for k in dims_out:
            if s_out[k] == 1:
                continue
            if s_out[k] % feats or inner_total % (s_out[k] // feats):
                return None
            return layout.moved(len(s_out), k, s_out[k] // feats)
        return None
    return None


def index_map(shape: tuple[int, ...], index: object) -> list[tuple[int | None, bool]] | None:
    """For ``x[index]``: per input dim, (output dim or None if removed, whether kept whole).

    Returns None for advanced (tensor/list) indexing, which the tracer does not follow.
    """
    ndim = len(shape)
    items = index if isinstance(index, tuple) else (index,)
    consuming = sum(1 for it in items if it is not None and it is not Ellipsis)
    out: list[tuple[int | None, bool]] = []
    o = 0
    for it in items:
        if it is None:
            o += 1
        elif it is Ellipsis:
            for _ in range(ndim - consuming):
                out.append((o, True))
                o += 1
        elif isinstance(it, bool) or not isinstance(it, (int, slice)):
            return None
        elif isinstance(it, int):
            out.append((None, False))
        else:
            size = shape[len(out)]
            out.append((o, it.indices(size) == (0, size, 1)))
            o += 1
    while len(out) < ndim:
        out.append((o, True))
        o += 1
    return out
