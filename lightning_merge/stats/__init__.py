"""Statistics for merging: feature moments, Gram, Fisher and K-FAC collectors, the pass, the store."""

from lightning_merge.stats.collect import COLLECTORS, collect_statistics, register_collector
from lightning_merge.stats.container import FeatureMoments, Statistics
from lightning_merge.stats.moments import FeatureMomentsCollector, moments_memory_bytes
from lightning_merge.stats.store import load_statistics, model_fingerprint, save_statistics

__all__ = [
    "COLLECTORS",
    "FeatureMoments",
    "FeatureMomentsCollector",
    "Statistics",
    "collect_statistics",
    "load_statistics",
    "model_fingerprint",
    "moments_memory_bytes",
    "register_collector",
    "save_statistics",
]
