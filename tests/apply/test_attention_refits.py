"""The refits reach self-attention's projections (torch applies them functionally: no hook sees them).

A ViT merged with a channel-permuted copy of itself (Permute: exact) has its attention weights
corrupted; each refit must then give the model back. Before this, the least-squares refits and
REPAIR walked Linear / Conv2d modules only, so in_proj (q, k, v) and out_proj kept the corruption.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge.apply.block_least_squares import refit_from_statistics
from lightning_merge.apply.least_squares import forward_order, least_squares_refit
from lightning_merge.apply.repair import repair_points, repair_rescale
from lightning_merge.graph import permute_model, random_permutations, trace_graph
from lightning_merge.methods import PermuteMerge
from lightning_merge.models.vit import ViT
from lightning_merge.stats.collect import collect_statistics

#: more images than the head's inputs (65 with the bias): a refit of the head alone cannot interpolate
#: its targets, so only a refit that reaches attention recovers the model
IMAGES = torch.randn(160, 1, 28, 28, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def twin_merge() -> dict:
    torch.manual_seed(0)
    model = ViT(width=0.5, num_layers=2).eval()
    graph = trace_graph(model, IMAGES[:2])
    twin = permute_model(copy.deepcopy(model), graph, random_permutations(graph, 7))
    data = DataLoader(TensorDataset(IMAGES), batch_size=80)
    stats = collect_statistics(
        [model, twin], graph, data, requires=["joint_inputs", "moments"], progress=False
    )
    result = PermuteMerge().merge([model, twin], graph=graph, stats=stats, data=data)
    with torch.no_grad():
        ref = model(IMAGES)
    return {
        "sources": [model, twin],
        "graph": graph,
        "data": data,
        "stats": stats,
        "result": result,
        "ref": ref,
    }


def _attention(model: nn.Module) -> list[nn.MultiheadAttention]:
    return [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]


def _error(model: nn.Module, ref: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(IMAGES) - ref).norm() / ref.norm())


@torch.no_grad()
def _add_noise(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(1)
    for a in _attention(model):
        a.in_proj_weight.add_(0.1 * torch.randn(a.in_proj_weight.shape, generator=gen))
        a.out_proj.weight.add_(0.1 * torch.randn(a.out_proj.weight.shape, generator=gen))
    return model


@torch.no_grad()
def _rescale_qkv(model: nn.Module) -> nn.Module:
    """A positive per-channel affine change of every q, k, v channel (what REPAIR can undo exactly)."""
    gen = torch.Generator().manual_seed(1)
    for a in _attention(model):
        scale = 0.5 + 1.5 * torch.rand(a.in_proj_weight.shape[0], generator=gen)
        a.in_proj_weight.mul_(scale[:, None])
        a.in_proj_bias.mul_(scale).add_(torch.randn(scale.shape, generator=gen))
    return model


def test_the_twin_merge_is_exact_and_the_corruption_is_large(twin_merge: dict) -> None:
    merged = twin_merge["result"].model.eval()
    assert _error(merged, twin_merge["ref"]) < 1e-6
    assert _error(_add_noise(copy.deepcopy(merged)), twin_merge["ref"]) > 0.1
    assert _error(_rescale_qkv(copy.deepcopy(merged)), twin_merge["ref"]) > 0.1


def test_propagated_least_squares_refits_in_proj_and_out_proj(twin_merge: dict) -> None:
    merged = _add_noise(copy.deepcopy(twin_merge["result"].model)).eval()
    t = twin_merge
    least_squares_refit(merged, t["sources"], t["graph"], t["result"].transforms, t["data"], ridge=1e-10)
    assert _error(merged, t["ref"]) < 1e-5


def test_published_refit_from_statistics_refits_in_proj_and_out_proj(twin_merge: dict) -> None:
    t = twin_merge
    joint = t["stats"].joint_inputs
    name = "vit.encoder.layers.encoder_layer_0.self_attention"
    assert float(joint[f"{name}.in_proj"].count) == float(joint[f"{name}.out_proj"].count) == 160 * 17
    merged = _add_noise(copy.deepcopy(t["result"].model)).eval()
    cost = refit_from_statistics(merged, t["sources"], t["graph"], t["result"].transforms, joint, ridge=0.0)
    assert {f"{name}.in_proj", f"{name}.out_proj"} <= set(cost)
    assert _error(merged, t["ref"]) < 1e-5


def test_repair_rescales_q_k_v(twin_merge: dict) -> None:
    t = twin_merge
    points = repair_points(t["sources"][0], t["graph"])
    assert "vit.encoder.layers.encoder_layer_1.self_attention.in_proj" in points
    merged = _rescale_qkv(copy.deepcopy(t["result"].model)).eval()
    repair_rescale(merged, t["sources"], t["graph"], t["result"].transforms, t["data"], eps=1e-12)
    assert _error(merged, t["ref"]) < 1e-5


class _CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x.flip(1), x, need_weights=False)[0]


def test_a_refit_refuses_attention_that_is_not_self_attention() -> None:
    with pytest.raises(ValueError, match="'attn' needs self-attention"):
        forward_order(_CrossAttention(), torch.randn(2, 3, 8))
