"""The registry's small ViT (torchvision ``VisionTransformer`` with the shared heads) and AdamW training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_merge.apply.twin import check_equivalence
from lightning_merge.graph import trace_graph
from lightning_merge.models import EmbeddingHead, SourceClassifier, build_model
from lightning_merge.models.vit import ViT


def test_default_size_and_tokens() -> None:
    """patch 7 on 28×28: 16 patch tokens + the class token, width 128, 4 layers of 4 heads, MLP 2×."""
    model = build_model("vit", in_channels=1, head="embedding", num_classes=10, embed_dim=32)
    assert isinstance(model, ViT) and isinstance(model.head, EmbeddingHead)
    assert model.vit.encoder.pos_embedding.shape == (1, 17, 128)
    assert len(model.vit.encoder.layers) == 4
    attn = model.vit.encoder.layers[0].self_attention
    assert (attn.embed_dim, attn.num_heads) == (128, 4)
    assert model.vit.encoder.layers[0].mlp[0].out_features == 256
    assert model.vit.conv_proj.in_channels == 1 and model.head.proj.in_features == 128


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"width": 0.26}, "multiple of num_heads"), ({"patch_size": 5}, "divisible by patch_size")],
)
def test_bad_sizes_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ViT(**kwargs)


def test_graph_keeps_heads_whole_and_is_exact() -> None:
    torch.manual_seed(0)
    model = ViT(width=0.5, num_layers=2).eval()
    x = torch.randn(2, 1, 28, 28)
    graph = trace_graph(model, x)
    attn = [s for s in graph.spaces if s.name.endswith("self_attention.attn")]
    assert [(s.size, s.group_size) for s in attn] == [(64, 16), (64, 16)]
    assert check_equivalence(model, graph, x) < 1e-10
    # the class embeddings are a fixed space: nothing of the head's frozen rows is merged
    params = {m.param for s in graph.spaces for m in s.members}
    assert "head.classes.weight" not in params and "head.proj.weight" in params


def test_adamw_option_builds_adamw_with_fixed_betas() -> None:
    clf = SourceClassifier(arch="vit", width=0.5, classes=[0, 1], optimizer="adamw", lr=1e-3)
    clf.trainer = type("T", (), {"estimated_stepping_batches": 10})()  # what configure_optimizers reads
    config = clf.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW)
    betas = optimizer.param_groups[0]["betas"]
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["betas"] == betas  # warmup + cosine on the lr only


def test_unknown_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adamw'"):
        SourceClassifier(arch="vit", optimizer="adam")


def test_training_step_reduces_the_loss() -> None:
    """A few AdamW steps on one fixed batch: the ViT is trainable through SourceClassifier."""
    torch.manual_seed(0)
    clf = SourceClassifier(arch="vit", width=0.5, classes=[0, 1, 2], optimizer="adamw", lr=3e-3)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 3, (16,))
    optimizer = torch.optim.AdamW(clf.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = nn.functional.cross_entropy(clf.own_logits(clf(x)), clf.targets(y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
