"""Wide layers keep their joint input rows (``JointRows``), not the (N·d)² sums, while the rows are
at most the joint width; past it they fold into the sums.

* The rows give PLeaS the same weights as the sums (to 1e-9 relative), with and without ridge, at
  widths 1 and 1.5 (structural zero blocks), because F Fᵀ = P G Pᵀ exactly; for Linear and conv.
* A layer whose rows outgrow its width mid-pass holds the sums the Gram path gives (1e-12).
* A permuted twin merges back exactly from rows.
* The rows survive the statistics store bitwise; the memory estimate leaves them out.
* ``all_gather_rows`` stacks two ranks' rows (unequal counts, one rank empty) in rank order; two
  ranks whose rows together outgrow the width both fold and sum, whichever of them folded alone.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import TypeVar

import pytest
import torch
from torch import nn

from lightning_merge.dataflow import Ranks, all_gather_rows
from lightning_merge.graph import trace_graph
from lightning_merge.graph.equivalence import permute_model, random_permutations
from lightning_merge.methods import PLeaSMerge
from lightning_merge.stats import joint_inputs as joint
from lightning_merge.stats.collect import collect_statistics
from lightning_merge.stats.container import FeatureMoments, JointRows
from lightning_merge.stats.store import load_statistics, save_statistics
from tests.stats_nets import MLP

BOTH = ("moments", "joint_inputs")
T = TypeVar("T")


def pair() -> list[nn.Module]:
    out = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        out.append(MLP().double().eval())
    return out


def data(count: int = 2, rows: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(rows, 8, generator=gen, dtype=torch.float64), torch.zeros(rows)) for _ in range(count)
    ]


def gather(models: list[nn.Module], rows_above: int, monkeypatch: pytest.MonkeyPatch, batches=None):  # noqa: ANN001, ANN201
    monkeypatch.setattr(joint, "ROWS_ABOVE", rows_above)
    graph = trace_graph(models[0], torch.zeros(2, 8, dtype=torch.float64))
    stats = collect_statistics(models, graph, batches or data(), requires=BOTH, progress=False)
    return graph, stats


def test_a_linear_wider_than_the_limit_keeps_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    models = pair()
    _, sums = gather(models, 10**9, monkeypatch)
    _, rows = gather(models, 20, monkeypatch)  # joint widths 16, 32, 24: fc2 and fc3 keep rows
    assert isinstance(rows.joint_inputs["fc1"], FeatureMoments)
    for name in ("fc2", "fc3"):
        kept = rows.joint_inputs[name]
        assert isinstance(kept, JointRows) and kept.rows.shape[0] == 24
        assert float(kept.count) == float(sums.joint_inputs[name].count) == 24
        torch.testing.assert_close(kept.rows.T @ kept.rows, sums.joint_inputs[name].outer, rtol=1e-12, atol=0)
        torch.testing.assert_close(kept.total, sums.joint_inputs[name].total, rtol=1e-12, atol=1e-12)
    sizes = joint.joint_inputs_memory_bytes(models[0], 2)
    assert sizes == 8 * (16 * 16 + 16 + 1)  # only fc1's sums are allocated up front


@pytest.mark.parametrize(("width", "ridge"), [(1.0, 1e-4), (1.5, 1e-4), (1.5, 0.0), (2.0, 1e-6)])
def test_rows_give_the_weights_the_sums_give(
    width: float, ridge: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = pair()
    graph, sums = gather(models, 10**9, monkeypatch)
    _, rows = gather(models, 0, monkeypatch)  # 24 rows: fc1 (width 16) folds, fc2 and fc3 keep them
    assert isinstance(rows.joint_inputs["fc1"], FeatureMoments)
    assert all(isinstance(rows.joint_inputs[n], JointRows) for n in ("fc2", "fc3"))
    method = PLeaSMerge(width=width, ridge=ridge)
    want = method.merge(models, graph=graph, stats=sums).model.state_dict()
    got = method.merge(models, graph=graph, stats=rows).model.state_dict()
    for key, w in want.items():
        scale = w.abs().max().clamp_min(1e-12)
        assert (got[key] - w).abs().max() <= 1e-9 * scale, key


def test_a_permuted_twin_merges_back_from_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    model = pair()[0]
    graph = trace_graph(model, torch.zeros(2, 8, dtype=torch.float64))
    twin = permute_model(copy.deepcopy(model), graph, random_permutations(graph, 3))
    _, stats = gather([model, twin], 0, monkeypatch)
    merged = PLeaSMerge(width=1.0, ridge=1e-10).merge([model, twin], graph=graph, stats=stats).model
    x = data(1, 64)[0][0]
    with torch.no_grad():
        ref = model(x)
        err = (merged(x) - ref).norm() / ref.norm()
    assert err < 1e-8


def test_rows_survive_the_statistics_store(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    graph, stats = gather(pair(), 20, monkeypatch)
    back = load_statistics(save_statistics(stats, tmp_path / "s.safetensors"), graph=graph)
    assert isinstance(back.joint_inputs["fc1"], FeatureMoments)
    for name in ("fc2", "fc3"):
        assert isinstance(back.joint_inputs[name], JointRows)
        assert torch.equal(back.joint_inputs[name].rows, stats.joint_inputs[name].rows)


def test_rows_of_the_wrong_width_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    models = pair()
    graph, stats = gather(models, 0, monkeypatch)
    stats.joint_inputs["fc2"] = stats.joint_inputs["fc3"]
    with pytest.raises(ValueError, match="'fc2'.*width 24.*2 models × 16"):
        PLeaSMerge().merge(models, graph=graph, stats=stats)
    with pytest.raises(ValueError, match="'fc3'.*rows of shape"):
        joint.JointInputsCollector.check({"fc3": JointRows(torch.zeros(5, 7, dtype=torch.float64), 2)}, 2)


def test_inputs_of_other_shapes_name_the_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(joint, "ROWS_ABOVE", 0)
    with pytest.raises(ValueError, match="layer 'fc2' differ in shape"):
        joint._joint_rows(nn.Linear(16, 2), [torch.zeros(3, 16), torch.zeros(4, 16)], "fc2")


def _on_two_ranks(fn: Callable[[int, Ranks], T]) -> list[T]:
    """``fn(rank, ranks)`` on two threads whose reduce_sum adds both ranks' tensors (a fake collective)."""
    slots: list[torch.Tensor | None] = [None, None]
    barrier = threading.Barrier(2)
    out: list[T | None] = [None, None]

    def reduce_sum(rank: int):  # noqa: ANN202
        def add(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        return add

    def run(rank: int) -> None:
        out[rank] = fn(rank, Ranks(rank, 2, reduce_sum(rank)))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out  # type: ignore[return-value]


@pytest.mark.parametrize("counts", [(3, 5), (0, 4), (2, 0)])
def test_two_ranks_rows_are_stacked_in_rank_order(counts: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(1)
    parts = [torch.randn(n, 6, generator=gen, dtype=torch.float64) for n in counts]
    for got in _on_two_ranks(lambda rank, ranks: all_gather_rows(parts[rank], ranks)):
        assert torch.equal(got, torch.cat(parts))


def test_rows_that_outgrow_the_width_fold_into_the_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    models = pair()
    batches = data(count=3)  # 36 rows: fc1 (16) folds in batch 2, fc3 (24) and fc2 (32) in batch 3
    _, sums = gather(models, 10**9, monkeypatch, batches)
    _, folded = gather(models, 0, monkeypatch, batches)
    for name, want in sums.joint_inputs.items():
        got = folded.joint_inputs[name]
        assert isinstance(got, FeatureMoments) and float(got.count) == 36, name
        torch.testing.assert_close(got.outer, want.outer, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.total, want.total, rtol=1e-12, atol=1e-12)


def conv_pair() -> tuple[list[nn.Module], object]:
    from tests.stats_nets import ConvNet

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(ConvNet().double().eval())
    return models, trace_graph(models[0], torch.zeros(2, 1, 6, 6, dtype=torch.float64))


def conv_data(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(4)
    return [
        (torch.randn(1, 1, 6, 6, generator=gen, dtype=torch.float64), torch.zeros(1)) for _ in range(count)
    ]


@pytest.mark.parametrize("width", [1.0, 1.5])
def test_conv_rows_give_the_weights_the_sums_give(width: float, monkeypatch: pytest.MonkeyPatch) -> None:
    models, graph = conv_pair()
    batches = conv_data(2)  # conv2: 2 images × 36 positions = 72 rows, its joint width 2·4·9 = 72
    monkeypatch.setattr(joint, "ROWS_ABOVE", 10**9)
    sums = collect_statistics(models, graph, batches, requires=BOTH, progress=False)
    monkeypatch.setattr(joint, "ROWS_ABOVE", 0)
    rows = collect_statistics(models, graph, batches, requires=BOTH, progress=False)
    kept = rows.joint_inputs["conv2"]
    assert isinstance(kept, JointRows) and kept.rows.shape == (72, 72)
    assert isinstance(rows.joint_inputs["conv1"], FeatureMoments)  # 72 rows > its width 18: folded
    torch.testing.assert_close(
        kept.rows.T @ kept.rows, sums.joint_inputs["conv2"].outer, rtol=1e-12, atol=1e-12
    )
    method = PLeaSMerge(width=width, ridge=1e-4)
    want = method.merge(models, graph=graph, stats=sums).model.state_dict()
    got = method.merge(models, graph=graph, stats=rows).model.state_dict()
    for key, w in want.items():  # fc: 2 rows for 432 joint inputs, ridge-bound; its rounding reaches 1e-9
        assert (got[key] - w).abs().max() <= 1e-8 * w.abs().max().clamp_min(1e-12), key


def test_a_conv_twin_merges_back_from_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    (model, _), graph = conv_pair()
    twin = permute_model(copy.deepcopy(model), graph, random_permutations(graph, 3))
    monkeypatch.setattr(joint, "ROWS_ABOVE", 0)
    batches = conv_data(2)
    stats = collect_statistics([model, twin], graph, batches, requires=BOTH, progress=False)
    assert isinstance(stats.joint_inputs["conv2"], JointRows)
    merged = PLeaSMerge(width=1.0, ridge=1e-10).merge([model, twin], graph=graph, stats=stats).model
    x = torch.cat([b for b, _ in batches])  # fc sees 2 rows for 216 inputs: exact on their span only
    with torch.no_grad():
        ref = model(x)
        err = (merged(x) - ref).norm() / ref.norm()
    assert err < 1e-8


def _two_rank_collectors(rows: list[list[torch.Tensor]]) -> list[joint.JointInputsCollector]:
    """Two collectors holding layer "fc"'s rows per rank (one chunk per batch, width 6; a rank whose
    own rows outgrow the width has folded them, as ``_add`` does), gathered on two threads."""
    collectors = []
    for chunks in rows:
        c = joint.JointInputsCollector()
        kept = [torch.zeros(0, 6, dtype=torch.float64), *chunks]
        if sum(len(x) for x in chunks) > 6:
            c.folded["fc"] = joint._fold(kept)
        else:
            c.rows["fc"] = kept
        collectors.append(c)
    _on_two_ranks(lambda rank, ranks: collectors[rank].gather(ranks))
    return collectors


@pytest.mark.parametrize("counts", [(2, 3), (4, 3), (8, 1), (0, 7)])
def test_two_ranks_fold_together_when_their_rows_outgrow_the_width(counts: tuple[int, int]) -> None:
    gen = torch.Generator().manual_seed(2)
    parts = [[torch.randn(n, 6, generator=gen, dtype=torch.float64)] for n in counts]
    every = torch.cat([p[0] for p in parts])
    for c in _two_rank_collectors(parts):
        ((name, got),) = c.result().items()
        assert name == "fc"
        if sum(counts) <= 6:
            assert isinstance(got, JointRows) and torch.equal(got.rows, every)
        else:
            assert isinstance(got, FeatureMoments) and float(got.count) == sum(counts)
            torch.testing.assert_close(got.outer, every.T @ every, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got.total, every.sum(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("free", "what"), [(100, "12 more rows"), (8 * 20 * 32, "the sums of its 36")])
def test_rows_and_folds_past_free_memory_are_named(
    free: int, what: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fc2 (joint width 32) adds 12 rows a batch and folds in the third: each allocation is checked."""
    import lightning_merge.stats.collect as collect

    real = collect.available_memory_bytes
    calls: list[int] = []

    def fake(device: torch.device) -> int | None:
        calls.append(1)
        return real(device) if len(calls) <= 2 else free  # the up-front check and the first adds pass

    monkeypatch.setattr(collect, "available_memory_bytes", fake)
    monkeypatch.setattr(joint, "ROWS_ABOVE", 30)  # fc2 only
    with pytest.raises(MemoryError, match=rf"layer 'fc2': {what}.* GiB free on cpu"):
        gather(pair(), 30, monkeypatch, data(count=3))
