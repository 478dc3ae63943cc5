"""What a statistic is made of: the pass protocol, the self-describing base class and sum states.

A collector registers the hooks it needs on the N source models in :meth:`attach`, does its
per-batch work in :meth:`step` (a forward for moments and Gram matrices, a forward + backward for
Fisher and K-FAC), keeps its sums as torchmetrics ``Metric`` states (``dist_reduce_fx="sum"``,
float64) and hands them to the pass in :meth:`states` for the one in-place cross-rank sum
(``lightning_merge.dataflow.all_reduce_sum_``; ``Metric.sync`` would gather W copies instead). The
statistics pass (``lightning_merge.stats.collect`` and the ``MergeStatistics`` callback) owns the
loop, the device and the sharding.

A :class:`StatisticCollector` also describes its result, so that nothing else in the package has
to know the statistic: :meth:`~StatisticCollector.to_tensors` / :meth:`~StatisticCollector.from_tensors`
are its (bitwise exact) serialisation, :meth:`~StatisticCollector.check` its consistency checks.
Registering the class (``lightning_merge.stats.registry.register_statistic``) is all the store, the
export digest, the callback and the methods' ``check_stats`` need.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torchmetrics import Metric

if TYPE_CHECKING:
    from lightning_merge.dataflow import Ranks
    from lightning_merge.graph.spec import MergeGraph
    from lightning_merge.stats.container import Statistics

_F64 = torch.float64


@runtime_checkable
class Collector(Protocol):
    """What the statistics pass runs: any object with these methods (registered or not)."""

    name: str  # the statistic it fills, e.g. "moments"

    def attach(self, models: Sequence[nn.Module]) -> None:
        """Register hooks / allocate states for these N models."""

    def detach(self) -> None:
        """Remove every hook registered by :meth:`attach`."""

    def step(self, models: Sequence[nn.Module], inputs: Tensor) -> None:
        """Accumulate one batch of inputs (already on the models' device)."""

    def states(self) -> list[Tensor]:
        """Every accumulated tensor, for the in-place distributed sum-reduction."""

    def fill(self, stats: Statistics) -> None:
        """Write the (reduced) results into ``stats``."""


class StatisticCollector(ABC):
    """A registered statistic: its collector, plus how its value is saved, loaded and checked.

    Subclasses set ``name`` (the key in :class:`~lightning_merge.stats.container.Statistics` and the
    prefix of its tensors in files), implement the pass methods and :meth:`result`, and the
    class-level :meth:`to_tensors`, :meth:`from_tensors` and :meth:`check`.
    """

    name: ClassVar[str] = ""

    @classmethod
    def from_graph(cls, graph: MergeGraph) -> StatisticCollector:
        """The collector for ``requires=[name]``; per-layer statistics need no merge graph."""
        return cls()

    @abstractmethod
    def attach(self, models: Sequence[nn.Module]) -> None: ...

    @abstractmethod
    def detach(self) -> None:
        """Remove every hook registered by :meth:`attach`."""

    @abstractmethod
    def step(self, models: Sequence[nn.Module], inputs: Tensor) -> None: ...

    @abstractmethod
    def states(self) -> list[Tensor]: ...

    @abstractmethod
    def result(self) -> Any:
        """The reduced value stored under ``stats[name]`` (copies, not the live states)."""

    def fill(self, stats: Statistics) -> None:
        stats[self.name] = self.result()

    @classmethod
    @abstractmethod
    def to_tensors(cls, value: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(tensors, meta)``: tensors by key relative to ``name/`` (no ``name/`` in it), and the
        JSON-serialisable rest; :meth:`from_tensors` must rebuild ``value`` bitwise from both."""

    @classmethod
    @abstractmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], meta: Any, num_models: int) -> Any:
        """The value back from :meth:`to_tensors`' output (``tensors`` in their saved order)."""

    @classmethod
    @abstractmethod
    def check(cls, value: Any, num_models: int) -> None:
        """Raise ``ValueError`` naming the culprit when ``value`` is not a consistent value of this
        statistic for ``num_models`` models."""


class ForwardCollector(StatisticCollector):
    """A statistic its hooks read off plain no-grad forwards of the N models (moments, Gram
    matrices, joint inputs). The statistics pass runs every such collector of a request over one
    shared forward per batch (:class:`SharedForward`) instead of a data pass each; alone, its
    :meth:`step` is that forward between :meth:`begin_batch` and :meth:`end_batch`."""

    def begin_batch(self) -> None:
        """Before the batch's forwards: hooks start recording."""

    @abstractmethod
    def end_batch(self) -> None:
        """After them: hooks stop, the batch is folded in, what the hooks kept is dropped."""

    def abort_batch(self) -> None:
        """After a forward raised: hooks stop and what they kept is dropped, without the checks of
        :meth:`end_batch` (whose complaint would hide the forward's error)."""
        self.end_batch()

    def step(self, models: Sequence[nn.Module], inputs: Tensor) -> None:
        SharedForward([self]).step(models, inputs)

    def gather(self, ranks: Ranks) -> None:
        """After the cross-rank sum of :meth:`states`: stack whatever is kept as rows instead of
        sums (every rank's, :func:`~lightning_merge.dataflow.all_gather_rows`). Sums only: nothing."""


class SharedForward:
    """Several :class:`ForwardCollector` as one :class:`Collector`: each batch goes through every
    model once, and all their hooks read that forward."""

    def __init__(self, parts: Sequence[ForwardCollector]) -> None:
        self.parts = list(parts)
        self.name = "+".join(c.name for c in self.parts)

    def attach(self, models: Sequence[nn.Module]) -> None:
        for c in self.parts:
            c.attach(models)

    def detach(self) -> None:
        for c in self.parts:
            c.detach()

    def step(self, models: Sequence[nn.Module], inputs: Tensor) -> None:
        for c in self.parts:
            c.begin_batch()
        try:
            with torch.no_grad():
                for model in models:
                    model(inputs)
        except BaseException:
            for c in self.parts:
                c.abort_batch()
            raise
        for c in self.parts:
            c.end_batch()

    def states(self) -> list[Tensor]:
        return [t for c in self.parts for t in c.states()]

    def gather(self, ranks: Ranks) -> None:
        """After the sums: the parts that keep rows stack every rank's (``ForwardCollector.gather``)."""
        for c in self.parts:
            c.gather(ranks)

    def fill(self, stats: Statistics) -> None:
        for c in self.parts:
            c.fill(stats)


class SumMetric(Metric):
    """A torchmetrics ``Metric`` whose states are float64 sums (``dist_reduce_fx="sum"``) of fixed shapes.

    ``add_state`` keeps a contiguous deep copy of every registered default for ``reset``, so a
    (d × d) zero default cost a second (d × d) buffer per state: 2× the memory of the moments
    (552 MiB for one 6000-wide space instead of 275; the (N·n)² sums of a ViT-B's twelve MLP spaces
    held 7.2 GB instead of 3.6). The registered defaults are 0-d zeros instead, the states are
    allocated at their shape here, and :meth:`reset` allocates them again. Synchronisation is left
    to the statistics pass (one in-place all-reduce per state), so ``sync_on_compute=False``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self) -> None:
        super().__init__(sync_on_compute=False, dist_sync_on_step=False, compute_with_cache=False)
        self._sum_shapes: dict[str, tuple[int, ...]] = {}

    def add_sum_state(self, name: str, shape: Sequence[int], device: torch.device | str | None) -> None:
        """Register float64 sum state ``name`` (a 0-d default) and allocate it at ``shape``."""
        self.add_state(name, torch.zeros((), dtype=_F64, device=device), dist_reduce_fx="sum")
        self._sum_shapes[name] = tuple(shape)
        setattr(self, name, torch.zeros(tuple(shape), dtype=_F64, device=device))

    def reset(self) -> None:
        """torchmetrics' reset (which restores the 0-d defaults), then every sum at its shape."""
        super().reset()
        for name, shape in self._sum_shapes.items():
            current = getattr(self, name)
            setattr(self, name, torch.zeros(shape, dtype=_F64, device=current.device))


class SumStates(SumMetric):
    """Named float64 sums as torchmetrics states, one per key: the keys (layer or parameter names,
    with dots) map to states ``s0, s1, ...``."""

    def __init__(self, shapes: Mapping[str, Sequence[int]], device: torch.device | str | None = None) -> None:
        super().__init__()
        self.index = {key: f"s{j}" for j, key in enumerate(shapes)}
        for key, shape in shapes.items():
            self.add_sum_state(self.index[key], shape, device)

    def update(self, key: str, value: Tensor | float) -> None:
        """Add ``value`` to the sum of ``key``."""
        getattr(self, self.index[key]).add_(value)

    def __getitem__(self, key: str) -> Tensor:
        return getattr(self, self.index[key])

    def keys(self) -> list[str]:
        return list(self.index)

    def values(self) -> list[Tensor]:
        return self.states()

    def items(self) -> list[tuple[str, Tensor]]:
        return list(self.compute().items())

    def compute(self) -> dict[str, Tensor]:
        return {key: getattr(self, state) for key, state in self.index.items()}

    def states(self) -> list[Tensor]:
        return [getattr(self, state) for state in self.index.values()]


def check_per_model(statistic: str, part: str, values: Any, num_models: int) -> None:
    """A per-model list of the right length (shared check of the per-model statistics)."""
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"statistics {statistic!r}: {part} is a {type(values).__name__}, expected a list")
    if len(values) != num_models:
        raise ValueError(
            f"statistics {statistic!r}: {part} covers {len(values)} models, the statistics are for "
            f"{num_models}"
        )


def check_square(statistic: str, where: str, tensor: Any) -> None:
    """A square matrix (Gram matrices, K-FAC factors)."""
    if not isinstance(tensor, Tensor) or tensor.ndim != 2 or tensor.shape[0] != tensor.shape[1]:
        shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise ValueError(f"statistics {statistic!r} {where}: expected a square matrix, got {shape}")


def split_per_model(tensors: Mapping[str, Tensor], num_models: int) -> list[dict[str, Tensor]]:
    """``{"<i>/<name>": t}`` back to ``[{name: t}]`` of ``num_models`` models (saved order kept)."""
    out: list[dict[str, Tensor]] = [{} for _ in range(num_models)]
    for key, tensor in tensors.items():
        i, name = key.split("/", 1)
        if not i.isdigit() or int(i) >= num_models:
            raise ValueError(f"tensor key {key!r} names no model among {num_models}")
        out[int(i)][name] = tensor
    return out
