"""Matchers: statistics → per-merge-point transforms (merge M, unmerge U)."""

from lightning_merge.match.mudsc import match_mudsc, weight_similarity
from lightning_merge.match.partial import match_partial
from lightning_merge.match.permute import hungarian, match_identity, match_permute
from lightning_merge.match.transform import SpaceTransform, from_assignment
from lightning_merge.match.weight_matching import match_weights
from lightning_merge.match.zip import match_zipit

__all__ = [
    "SpaceTransform",
    "from_assignment",
    "hungarian",
    "match_identity",
    "match_mudsc",
    "match_partial",
    "match_permute",
    "match_weights",
    "match_zipit",
    "weight_similarity",
]
