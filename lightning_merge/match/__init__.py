"""Matchers: statistics → per-merge-point transforms (merge M, unmerge U)."""

from lightning_merge.match.transform import SpaceTransform, from_assignment

__all__ = ["SpaceTransform", "from_assignment"]
