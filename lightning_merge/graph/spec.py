"""The merge graph: which tensor axes share one feature transform, and where features are observed.

This file is the shared vocabulary of the whole library (trace → statistics → matching → apply):

* a :class:`Space` (a "merge point") is a set of parameter/buffer axes that must be transformed
  together, e.g. ``conv1.weight`` axis 0, ``bn1.*`` axis 0 and ``conv2.weight`` axis 1;
* an :class:`AxisRef` says where in one tensor axis the space's ``size`` features live
  (``role="out"``: the tensor *produces* the features, merged with M; ``role="in"``: it *consumes*
  them, merged with U);
* a :class:`Tap` is a module whose input carries features of one or more spaces; the statistics
  pass hooks it (``forward_pre_hook``) to observe them;
* a :class:`CutPoint` is an fx node where partial zipping may stop (every path from the input to
  the output runs through it).

Everything here is plain data (JSON-serialisable) so a user can write or correct a graph by hand.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

Role = Literal["out", "in"]


@dataclass(frozen=True)
class AxisRef:
    """Positions of a space's features inside one axis of one parameter or buffer.

    The axis (length L) is read as ``offset + o * outer_stride + f * inner + i`` for
    ``o < outer``, feature ``f < size`` and ``i < inner``. Examples: a conv weight's axis 0 is
    ``(offset=0, outer=1, inner=1)``; a Linear after ``flatten`` of a (C, H, W) map has
    ``inner=H*W``; ``nn.MultiheadAttention.in_proj_weight`` axis 0 holds q, k, v as ``outer=3``
    with ``outer_stride=embed_dim``; a Linear after ``cat`` of two spaces has ``offset`` on the second.
    """

    param: str
    axis: int
    role: Role
    offset: int = 0
    outer: int = 1
    outer_stride: int = 0  # 0 means size * inner (contiguous blocks)
    inner: int = 1

    def positions(self, size: int) -> torch.Tensor:
        """Index tensor of shape (size, outer * inner): the axis positions of every feature."""
        stride = self.outer_stride or size * self.inner
        f = torch.arange(size).view(size, 1, 1) * self.inner
        o = torch.arange(self.outer).view(1, self.outer, 1) * stride
        i = torch.arange(self.inner).view(1, 1, self.inner)
        return (self.offset + f + o + i).reshape(size, -1)


@dataclass(frozen=True)
class Segment:
    """Features ``[offset, offset + size)`` of a tapped tensor's channel axis belong to ``space``."""

    space: str
    offset: int
    size: int


@dataclass(frozen=True)
class Tap:
    """Where the statistics pass observes features: the first input of module ``module``.

    ``channel_dim`` is the channel axis of that input (1 for NCHW, -1 for tokens); every other axis
    is a sample axis. ``inner > 1`` means the channel axis is a flattened (C, inner) block and each
    of the ``inner`` positions is a sample. ``kind="attention"`` (nn.MultiheadAttention) observes
    the q, k and v projections of the query input instead of the input itself.
    """

    module: str
    channel_dim: int
    segments: tuple[Segment, ...]
    inner: int = 1
    kind: Literal["input", "attention"] = "input"


@dataclass
class Space:
    """One merge point: ``size`` features that share a transform across all ``members``.

    ``group_size > 1`` keeps groups of that many consecutive features intact (attention heads,
    GroupNorm groups): a valid permutation moves whole groups and permutes within them.
    """

    name: str
    size: int
    members: list[AxisRef] = field(default_factory=list)
    group_size: int = 1

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ValueError(f"space {self.name!r}: size must be positive, got {self.size}")
        if self.size % self.group_size:
            raise ValueError(
                f"space {self.name!r}: group_size {self.group_size} does not divide size {self.size}"
            )


@dataclass(frozen=True)
class CutPoint:
    """An fx node where partial zipping may stop; its output's channels are in ``space``."""

    node: str
    space: str
    channel_dim: int
    depth: float  # fraction of the model's spaces (in forward order) merged before this point


@dataclass
class MergeGraph:
    """All merge points of one architecture, in forward order, plus taps and cut points."""

    spaces: list[Space]
    taps: list[Tap]
    cut_points: list[CutPoint]
    param_shapes: dict[str, tuple[int, ...]]

    def space(self, name: str) -> Space:
        for s in self.spaces:
            if s.name == name:
                return s
        raise KeyError(f"no merge point named {name!r}; known: {[s.name for s in self.spaces]}")

    def producer_of(self, param: str) -> tuple[Space, AxisRef] | None:
        """The merge point whose features ``param`` produces (its ``out`` member) and that member, or None."""
        for space in self.spaces:
            for ref in space.members:
                if ref.param == param and ref.role == "out":
                    return space, ref
        return None

    def whole_producer(self, param: str, copies: int, expectation: str) -> str | None:
        """The merge point whose features make up all of ``param``'s axis 0, ``copies`` times stacked
        (3: q, k, v), or None when ``param`` produces none; any other layout raises ``ValueError``
        with ``expectation`` (who needs which layout)."""
        found = self.producer_of(param)
        if found is None:
            return None
        space, ref = found
        if ref.axis != 0 or ref.offset or ref.outer != copies or ref.inner != 1:
            raise ValueError(f"{expectation} {space.name!r}")
        return space.name

    def to_dict(self) -> dict:
        return {
            "spaces": [asdict(s) for s in self.spaces],
            "taps": [asdict(t) for t in self.taps],
            "cut_points": [asdict(c) for c in self.cut_points],
            "param_shapes": {k: list(v) for k, v in self.param_shapes.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> MergeGraph:
        spaces = [
            Space(
                name=s["name"],
                size=s["size"],
                members=[AxisRef(**m) for m in s["members"]],
                group_size=s.get("group_size", 1),
            )
            for s in data["spaces"]
        ]
        taps = [
            Tap(
                module=t["module"],
                channel_dim=t["channel_dim"],
                segments=tuple(Segment(**g) for g in t["segments"]),
                inner=t.get("inner", 1),
                kind=t.get("kind", "input"),
            )
            for t in data.get("taps", [])
        ]
        cuts = [CutPoint(**c) for c in data.get("cut_points", [])]
        shapes = {k: tuple(v) for k, v in data.get("param_shapes", {}).items()}
        return cls(spaces=spaces, taps=taps, cut_points=cuts, param_shapes=shapes)

    def digest(self) -> str:
        """Stable hash: statistics and recipes record it so they cannot be used with another graph."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
