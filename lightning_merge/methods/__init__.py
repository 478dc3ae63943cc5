"""Merge methods. Importing a method module registers it in ``METHODS``.

Method modules are imported here once they exist; each adds one line.
"""

from lightning_merge.methods.base import METHODS, MergeMethod, get_method, register_method

__all__ = ["METHODS", "MergeMethod", "get_method", "register_method"]
