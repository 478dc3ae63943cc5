"""Saving and loading statistics: exact round trip, detected corruption and mismatches."""

from __future__ import annotations

import json

import pytest
import torch
from stats_nets import MLP, make_models, mlp_graph
from torch.utils.data import DataLoader

from lightning_merge.stats.collect import collect_statistics
from lightning_merge.stats.container import Statistics
from lightning_merge.stats.store import (
    StatisticsFileError,
    StatisticsMismatchError,
    load_statistics,
    model_fingerprint,
    save_statistics,
    sidecar_path,
)


def full_statistics() -> tuple[Statistics, list, object]:
    models = make_models(MLP, n=2)
    graph = mlp_graph(models[0])
    stats = collect_statistics(models, graph, DataLoader(torch.randn(40, 8), batch_size=8), progress=False)
    g = torch.Generator().manual_seed(1)
    stats.grams = [{"fc2": torch.randn(17, 17, dtype=torch.float64, generator=g)} for _ in range(2)]
    stats.gram_counts = [{"fc2": 40.0}, {"fc2": 40.0}]
    stats.fisher = [
        {"fc1.weight": torch.rand(16, 8, generator=g), "fc1.bias": torch.rand(16)} for _ in range(2)
    ]
    stats.fisher_counts = [40.0, 40.0]
    stats.kfac = [{"fc3": (torch.randn(13, 13, dtype=torch.float64), torch.randn(3, 3))} for _ in range(2)]
    stats.kfac_counts = [40.0, 39.0]
    return stats, models, graph


def assert_same(a: Statistics, b: Statistics) -> None:
    assert (a.num_models, a.graph_digest) == (b.num_models, b.graph_digest)
    assert list(a.moments) == list(b.moments)
    for space in a.moments:
        for name in ("count", "total", "outer"):
            x, y = getattr(a.moments[space], name), getattr(b.moments[space], name)
            assert x.dtype == y.dtype and torch.equal(x, y)  # bitwise
    for field in ("grams", "fisher"):
        for da, db in zip(getattr(a, field), getattr(b, field), strict=True):
            assert list(da) == list(db) and all(torch.equal(da[k], db[k]) for k in da)
    for da, db in zip(a.kfac, b.kfac, strict=True):
        assert all(torch.equal(x, y) for k in da for x, y in zip(da[k], db[k], strict=True))
    assert (a.gram_counts, a.fisher_counts, a.kfac_counts) == (b.gram_counts, b.fisher_counts, b.kfac_counts)


def test_round_trip_is_exact_for_every_field(tmp_path) -> None:
    stats, models, graph = full_statistics()
    path = tmp_path / "sub" / "stats.safetensors"
    save_statistics(stats, path, model_fingerprints=[model_fingerprint(m) for m in models])
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["statistics"] == ["moments", "grams", "fisher", "kfac"]
    assert meta["num_tensors"] == 2 * 3 + 2 + 4 + 4
    assert meta["statistic_meta"]["moments"]["counts"] == {"h1": 40.0, "h2": 40.0}
    assert meta["statistic_meta"]["kfac"] == {"counts": [40.0, 39.0]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["stats.safetensors", "stats.safetensors.json"]
    assert_same(stats, load_statistics(path, graph=graph, models=models))


def test_truncated_or_partial_files_raise(tmp_path) -> None:
    stats, _, _ = full_statistics()
    path = save_statistics(stats, tmp_path / "s.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StatisticsFileError, match=r"s\.safetensors .*truncated"):
        load_statistics(path)
    path.write_bytes(data)
    load_statistics(path)  # intact again
    sidecar_path(path).unlink()
    with pytest.raises(StatisticsFileError, match=r"no sidecar .*s\.safetensors\.json"):
        load_statistics(path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_statistics(tmp_path / "missing.safetensors")


def test_other_graph_or_models_raise(tmp_path) -> None:
    stats, models, graph = full_statistics()
    path = save_statistics(
        stats, tmp_path / "s.safetensors", model_fingerprints=[model_fingerprint(m) for m in models]
    )
    other_graph = mlp_graph(models[0])
    other_graph.spaces[0].group_size = 2
    with pytest.raises(StatisticsMismatchError, match="another graph"):
        load_statistics(path, graph=other_graph)
    with torch.no_grad():
        models[1].fc3.bias[0] += 1e-6
    with pytest.raises(StatisticsMismatchError, match="other models: model 1"):
        load_statistics(path, models=models)
    with pytest.raises(StatisticsMismatchError, match="for 2 models, got 1"):
        load_statistics(path, models=models[:1])
    bare = save_statistics(stats, tmp_path / "bare.safetensors")
    with pytest.raises(StatisticsMismatchError, match="without model fingerprints"):
        load_statistics(bare, models=models)
    with pytest.raises(ValueError, match="1 entries for 2 models"):
        save_statistics(stats, tmp_path / "x.safetensors", model_fingerprints=["abc"])


def test_fingerprint_tracks_weights_and_buffers() -> None:
    a, b = make_models(MLP, n=2)
    assert model_fingerprint(a) != model_fingerprint(b)
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a) == model_fingerprint(b)
    b.register_buffer("extra", torch.zeros(2, dtype=torch.bfloat16))
    assert model_fingerprint(a) != model_fingerprint(b)
