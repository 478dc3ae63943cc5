"""Applying merge transforms: merged weights, merged modules, partial zips, least squares, BN reset."""

from lightning_merge.apply.batchnorm_reset import reset_batchnorm
from lightning_merge.apply.least_squares import least_squares_refit
from lightning_merge.apply.module import build_merged_module, resize_to_state_dict
from lightning_merge.apply.partial import PartialZipModel, build_partial, resolve_cut
from lightning_merge.apply.weights import merge_state_dicts

__all__ = [
    "PartialZipModel",
    "build_merged_module",
    "build_partial",
    "least_squares_refit",
    "merge_state_dicts",
    "reset_batchnorm",
    "resize_to_state_dict",
    "resolve_cut",
]
