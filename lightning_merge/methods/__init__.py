"""Merge methods, each named by its class (``ZipItMerge(alpha=0.3)``; YAML: ``class_path``).

``ALL_METHODS`` lists every built-in method class, for tests and benchmarks that cover them all.
"""

from lightning_merge.methods.aligned import AlignedMerge
from lightning_merge.methods.average import AverageMerge
from lightning_merge.methods.base import MergeMethod, MergeResult
from lightning_merge.methods.config import build_method, method_config
from lightning_merge.methods.fisher_merge import FisherMerge
from lightning_merge.methods.mats import MaTS
from lightning_merge.methods.mudsc import MuDSCMerge
from lightning_merge.methods.permute import PermuteMerge
from lightning_merge.methods.pleas import PLeaSMerge
from lightning_merge.methods.regmean import RegMean
from lightning_merge.methods.same_base import SameBaseMethod
from lightning_merge.methods.task_arithmetic import TaskArithmetic
from lightning_merge.methods.ties import TIES
from lightning_merge.methods.transform_base import TransformMethod
from lightning_merge.methods.weight_matching import WeightMatchingMerge
from lightning_merge.methods.zipit import ZipItMerge

#: every built-in method: different-initialisation (matching) methods first, then same-base ones
ALL_METHODS: tuple[type[MergeMethod], ...] = (
    AverageMerge,
    WeightMatchingMerge,
    PermuteMerge,
    ZipItMerge,
    MuDSCMerge,
    PLeaSMerge,
    AlignedMerge,
    TaskArithmetic,
    TIES,
    FisherMerge,
    RegMean,
    MaTS,
)

__all__ = [
    "ALL_METHODS",
    "AlignedMerge",
    "AverageMerge",
    "FisherMerge",
    "MaTS",
    "MergeMethod",
    "MergeResult",
    "MuDSCMerge",
    "PLeaSMerge",
    "PermuteMerge",
    "RegMean",
    "SameBaseMethod",
    "TIES",
    "TaskArithmetic",
    "TransformMethod",
    "WeightMatchingMerge",
    "ZipItMerge",
    "build_method",
    "method_config",
]
