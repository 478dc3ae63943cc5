"""What every merge method is and returns: :class:`MergeMethod` and :class:`MergeResult`.

A method is a plain object named by its class (``ZipItMerge(alpha=0.3)`` in Python, ``class_path``
+ ``init_args`` in YAML). Its ``__init__`` takes typed keyword arguments (so LightningCLI /
jsonargparse can build it), validates them there (naming the bad value) and keeps each one under
its own name; nothing else is stored on the instance. :meth:`MergeMethod.merge` returns everything
a call produced in a :class:`MergeResult`, so one method object can serve any number of merges.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match.transform import SpaceTransform
from lightning_merge.stats.container import Statistics
from lightning_merge.stats.registry import statistic_collector


@dataclass(frozen=True)
class MergeResult:
    """The outcome of one :meth:`MergeMethod.merge` call.

    ``model``: the merged model (a ``PartialZipModel`` for a partial zip); ``transforms``: the
    matching methods' transform per merge point (what REPAIR rescales by), ``None`` for the others;
    ``diagnostics``: per-call details such as MaTS' conjugate-gradient histories.
    """

    model: nn.Module
    transforms: Mapping[str, SpaceTransform] | None = None
    diagnostics: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"MergeResult.model must be an nn.Module, got {type(self.model).__name__}")


class MergeMethod(ABC):
    """Turns N source models (and the statistics it ``requires``) into a :class:`MergeResult`.

    ``requires`` lists what the statistics pass must gather for it: any of ``"moments"``
    (feature moments per merge point), ``"grams"``, ``"fisher"``, ``"kfac"``.
    ``needs_base`` is True for methods that need the shared pre-trained base (task vectors);
    ``needs_data`` for methods that read the calibration loader in :meth:`merge`.
    ``reset_sources``: the pipeline resets the *sources'* BatchNorm statistics on the calibration
    data before the statistics pass (ZipIt!'s and MuDSC's official pipelines do; the merge, its
    statistics and the source references then all use the reset sources); a class attribute, or an
    instance attribute of that name where an ``__init__`` argument of that name sets it.
    Subclasses set these as class attributes, or as read-only properties when an ``__init__``
    argument decides them; never on the instance. ``name`` is a short label for tables and logs.
    """

    name: ClassVar[str] = ""
    requires: frozenset[str] = frozenset()
    needs_base: bool = False
    needs_data: bool = False
    reset_sources: bool = False
    has_transforms: ClassVar[bool] = False  # merge() returns per-merge-point transforms (REPAIR needs them)

    @abstractmethod
    def merge(
        self,
        sources: Sequence[nn.Module],
        *,
        graph: MergeGraph | None,
        stats: Statistics | None,
        base: nn.Module | None = None,
        data: Iterable[Any] | None = None,
    ) -> MergeResult:
        """Merge ``sources``; never modify them nor ``self``.

        ``data`` is the calibration loader (batches of inputs, or (inputs, targets) tuples) for
        methods that need a pass of their own after matching (PLeaS' least squares).
        """

    def check_stats(self, stats: Statistics | None) -> None:
        """Raise a clear error when a required statistic was not gathered or is inconsistent
        (each statistic's registered collector checks its own value)."""
        missing = [r for r in sorted(self.requires) if stats is None or r not in stats]
        if missing:
            raise ValueError(
                f"method {self.name!r} needs statistics {missing} that were not gathered; "
                f"run the statistics pass with them requested (MergeStatistics(...))"
            )
        for name in sorted(self.requires):  # stats is not None here unless nothing is required
            statistic_collector(name).check(stats[name], stats.num_models)  # type: ignore[union-attr]

    def __repr__(self) -> str:
        from lightning_merge.methods.config import init_arguments

        args = ", ".join(f"{k}={v!r}" for k, v in init_arguments(self).items())
        return f"{type(self).__name__}({args})"
