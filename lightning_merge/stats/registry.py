"""The one table of statistics: name → :class:`~lightning_merge.stats.collector.StatisticCollector`.

The statistics pass builds collectors from it, the store and the export digest serialise through
it, the ``MergeStatistics`` callback validates ``requires`` against it and methods' ``check_stats``
checks values with it. Adding a statistic is one file with a ``StatisticCollector`` subclass
decorated with :func:`register_statistic`; the built-in ones are imported (so registered) by
``lightning_merge.stats``.
"""

from __future__ import annotations

from typing import TypeVar

from lightning_merge.stats.collector import StatisticCollector

STATISTICS: dict[str, type[StatisticCollector]] = {}

C = TypeVar("C", bound=type[StatisticCollector])


def register_statistic(cls: C) -> C:
    """Class decorator: make ``cls`` the collector of the statistic ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, StatisticCollector)):
        raise TypeError(f"{cls!r} is not a StatisticCollector subclass")
    name = cls.name
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"{cls.__name__}.name must be a non-empty string without '/', got {name!r}")
    if name in STATISTICS and STATISTICS[name] is not cls:
        raise ValueError(f"statistic {name!r} is already registered by {STATISTICS[name].__qualname__}")
    STATISTICS[name] = cls
    return cls


def unregister_statistic(name: str) -> None:
    """Remove a registration (for tests and plug-ins that register temporarily)."""
    STATISTICS.pop(name, None)


def known_statistics() -> list[str]:
    """Every registered statistic name, sorted."""
    return sorted(STATISTICS)


def statistic_collector(name: str) -> type[StatisticCollector]:
    """The registered collector class of ``name``; unknown names list the known ones."""
    try:
        return STATISTICS[name]
    except KeyError:
        raise KeyError(
            f"unknown statistic {name!r}; registered: {known_statistics()} "
            "(register a StatisticCollector subclass with @register_statistic)"
        ) from None
