"""Merge methods. Importing a method module registers it in ``METHODS``.

Method modules are imported here once they exist; each adds one line.
"""

from lightning_merge.methods.base import METHODS, MergeMethod, get_method, register_method

__all__ = ["METHODS", "MergeMethod", "get_method", "register_method"]

# same-base merges (issue 6)
from lightning_merge.methods import fisher_merge, mats, regmean, task_arithmetic, ties  # noqa: E402, F401

# isort: split
# different-initialisation merges (issue 5)
from lightning_merge.methods import average, mudsc, permute, pleas, weight_matching, zipit  # noqa: E402, F401
from lightning_merge.methods.transform_base import TransformMethod  # noqa: E402, F401

# isort: split
# RegMean / MaTS / Fisher after a one-to-one alignment (uses the methods above)
from lightning_merge.methods import aligned  # noqa: E402, F401
