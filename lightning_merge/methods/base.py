"""The merge-method registry: one class per method, registered by name.

A method is a plain object whose ``__init__`` takes its hyperparameters as typed keyword
arguments (so LightningCLI/jsonargparse can build it from YAML via ``class_path``), validates them
there (naming the bad value), and implements :meth:`MergeMethod.merge`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from torch import nn

from lightning_merge.graph.spec import MergeGraph
from lightning_merge.stats.container import Statistics
from lightning_merge.stats.registry import statistic_collector

METHODS: dict[str, type[MergeMethod]] = {}


@dataclass(frozen=True)
class MergeResult:
    """What a merge produced: the model, and what post-merge passes and reports need of it."""

    model: nn.Module  # the merged model (a PartialZipModel for a partial zip)
    transforms: Mapping[str, Any] | None = None  # matching methods: SpaceTransform per merge point
    diagnostics: Mapping[str, Any] = field(default_factory=dict)  # e.g. CG iterations / residuals


M = TypeVar("M", bound="type[MergeMethod]")


class MergeMethod(ABC):
    """Turns N source models (and the statistics it ``requires``) into one merged ``nn.Module``.

    ``requires`` lists what the statistics pass must gather for it: any of ``"moments"``
    (feature moments per merge point), ``"grams"``, ``"fisher"``, ``"kfac"``.
    ``needs_base`` is True for methods that need the shared pre-trained base (task vectors);
    ``needs_data`` for methods that read the calibration loader in :meth:`merge`.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    needs_base: ClassVar[bool] = False
    needs_data: ClassVar[bool] = False
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
    ) -> nn.Module:
        """Return the merged model; never modify ``sources``.

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


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: ``@register_method("zipit")``. Importing the module registers it."""

    def wrap(cls: M) -> M:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"merge method {name!r} is already registered by {METHODS[name].__name__}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def get_method(name: str, **kwargs: object) -> MergeMethod:
    """Instantiate a registered method by name; unknown names list the registered ones."""
    import lightning_merge.methods  # noqa: F401  (registers the built-in methods)

    if name not in METHODS:
        raise KeyError(f"unknown merge method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name](**kwargs)
