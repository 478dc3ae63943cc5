"""Statistics for merging: the registry of self-describing collectors, the pass, the store.

Importing the package registers the built-in statistics: feature moments, Gram matrices, diagonal
Fisher and K-FAC factors.
"""

from lightning_merge.stats import fisher, gram, kfac, moments  # noqa: F401  (registers them)
from lightning_merge.stats.collect import collect_statistics
from lightning_merge.stats.collector import StatisticCollector, SumStates
from lightning_merge.stats.container import FeatureMoments, Statistics
from lightning_merge.stats.moments import FeatureMomentsCollector, moments_memory_bytes
from lightning_merge.stats.registry import (
    STATISTICS,
    known_statistics,
    register_statistic,
    statistic_collector,
)
from lightning_merge.stats.store import load_statistics, model_fingerprint, save_statistics

__all__ = [
    "STATISTICS",
    "FeatureMoments",
    "FeatureMomentsCollector",
    "StatisticCollector",
    "Statistics",
    "SumStates",
    "collect_statistics",
    "known_statistics",
    "load_statistics",
    "model_fingerprint",
    "moments_memory_bytes",
    "register_statistic",
    "save_statistics",
    "statistic_collector",
]
