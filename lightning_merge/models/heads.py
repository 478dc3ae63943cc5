"""Classifier heads for models trained on disjoint label spaces.

(a) ``LinearHead``: a linear layer over the model's own classes; a set of models predicts jointly by
    the argmax over their concatenated heads (see ``scatter_to_global`` / ``joint_predict``).
(b) ``EmbeddingHead``: a trained projection into a frozen class-embedding space shared by every model
    (fixed orthonormal rows, a stand-in for CLIP text embeddings). Its logits cover *all* classes, so
    a fully merged model keeps a single head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Seed of the class embeddings: fixed, independent of the global seed, so all models share them.
EMBEDDING_SEED = 20240229


def orthonormal_embeddings(num_classes: int, embed_dim: int, seed: int = EMBEDDING_SEED) -> torch.Tensor:
    """``num_classes × embed_dim`` float32 matrix with orthonormal rows, identical on every call."""
    if num_classes < 1 or embed_dim < num_classes:
        raise ValueError(
            f"need 1 <= num_classes <= embed_dim for orthonormal class embeddings, "
            f"got num_classes={num_classes}, embed_dim={embed_dim}"
        )
    g = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(embed_dim, num_classes, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # unique QR: positive diagonal of R
    return q.T.contiguous().float()


class ClassEmbedding(nn.Module):
    """Frozen class embeddings: ``logits = z @ weight.T`` with fixed orthonormal rows ``weight``.

    A separate leaf module: its input axis is a fixed (shared) space that merging never permutes.
    Rows have equal norms, so the argmax class is the class whose embedding is nearest to ``z``.
    No cosine normalisation of ``z``: it would not change any prediction (the argmax is invariant to
    the scale of ``z``) but its gradient grows like ``1/‖z‖`` and derails BatchNorm-free networks.
    """

    def __init__(self, num_classes: int, embed_dim: int) -> None:
        super().__init__()
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.register_buffer("weight", orthonormal_embeddings(num_classes, embed_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight.T

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embed_dim={self.embed_dim}"


class EmbeddingHead(nn.Module):
    """Trained ``proj`` into the shared embedding space, then frozen ``classes``: logits over all classes."""

    def __init__(self, in_features: int, num_classes: int = 10, embed_dim: int = 32) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, embed_dim)
        self.classes = ClassEmbedding(num_classes, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classes(self.proj(x))


class LinearHead(nn.Module):
    """A linear layer over the model's own classes only (``num_classes`` = the size of its task)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def make_head(kind: str, in_features: int, num_classes: int, embed_dim: int = 32) -> nn.Module:
    """Build a head by name: ``"embedding"`` (over all ``num_classes``) or ``"linear"`` (own classes)."""
    if kind == "embedding":
        return EmbeddingHead(in_features, num_classes, embed_dim)
    if kind == "linear":
        return LinearHead(in_features, num_classes)
    raise ValueError(f"unknown head {kind!r}; choose 'embedding' or 'linear'")


def scatter_to_global(logits: torch.Tensor, classes: Sequence[int], num_classes: int) -> torch.Tensor:
    """Place a linear head's logits (own classes) at their global positions; other classes get -inf."""
    if logits.shape[-1] != len(classes):
        raise ValueError(f"logits have {logits.shape[-1]} columns but classes lists {len(classes)} ids")
    if any(not 0 <= c < num_classes for c in classes):
        raise ValueError(f"classes {list(classes)} must lie in [0, {num_classes})")
    out = logits.new_full((*logits.shape[:-1], num_classes), float("-inf"))
    out[..., list(classes)] = logits
    return out


def joint_predict(global_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """Joint class prediction of several models whose logits are already in global positions.

    For linear heads (``-inf`` outside each model's task) this is the argmax over the concatenated
    heads; for embedding heads it is the argmax of the best score any model gives each class.
    """
    if len(global_logits) == 0:
        raise ValueError("joint_predict needs at least one logits tensor")
    return torch.stack(list(global_logits)).amax(0).argmax(-1)
