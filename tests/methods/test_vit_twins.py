"""Twin recovery on the registry's ViT: merging it with a channel-permuted copy of itself gives the
model back (relative output error < 1e-5) for every matching method, attention heads kept whole."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge.graph import permute_model, random_permutations, trace_graph
from lightning_merge.methods import MuDSCMerge, PermuteMerge, PLeaSMerge, ZipItMerge
from lightning_merge.models.vit import ViT
from lightning_merge.stats.collect import collect_statistics

IMAGES = torch.randn(96, 1, 28, 28, generator=torch.Generator().manual_seed(0))
#: ZipIt! without its within-model merges (α = β = 0); PLeaS at the source width with a tiny ridge
METHODS = {
    "permute": lambda: PermuteMerge(),
    "zipit": lambda: ZipItMerge(alpha=0.0, beta=0.0),
    "mudsc": lambda: MuDSCMerge(),
    "pleas published": lambda: PLeaSMerge(width=1.0, ridge=1e-8),
    "pleas propagated": lambda: PLeaSMerge(width=1.0, ridge=1e-8, objective="propagated"),
}


@pytest.fixture(scope="module")
def twins() -> dict[str, Any]:
    torch.manual_seed(0)
    model = ViT(width=0.5, num_layers=2).eval()
    graph = trace_graph(model, IMAGES[:2])
    perms = random_permutations(graph, 3)
    twin = permute_model(copy.deepcopy(model), graph, perms)
    data = DataLoader(TensorDataset(IMAGES), batch_size=48)
    requires = sorted(set().union(*(make().requires for make in METHODS.values())))
    stats = collect_statistics([model, twin], graph, data, requires=requires, progress=False)
    with torch.no_grad():
        ref, twin_out = model(IMAGES), twin(IMAGES)
    assert float((twin_out - ref).norm() / ref.norm()) < 1e-6  # the copy computes the same function
    attn = [s.name for s in graph.spaces if s.group_size > 1]
    assert len(attn) == 2 and any(not torch.equal(perms[a], torch.arange(len(perms[a]))) for a in attn)
    return {"models": [model, twin], "graph": graph, "stats": stats, "data": data, "ref": ref}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_merging_a_permuted_vit_returns_the_vit(twins: dict[str, Any], name: str) -> None:
    result = METHODS[name]().merge(
        twins["models"], graph=twins["graph"], stats=twins["stats"], data=twins["data"]
    )
    merged = result.model.eval()
    with torch.no_grad():
        err = float((merged(IMAGES) - twins["ref"]).norm() / twins["ref"].norm())
    assert err < 1e-5, f"{name}: relative output error {err:.2e}"
