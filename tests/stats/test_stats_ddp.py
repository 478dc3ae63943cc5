"""A 2-process gloo DDP run gives the same statistics as one process over the same (odd-sized) data."""

from __future__ import annotations

import pytest
import torch
from ddp_launch import run_ddp_script
from stats_ddp_script import NUM_SAMPLES, Sources
from torch.utils.data import DataLoader, DistributedSampler

from lightning_merge.dataflow import ShardSampler
from lightning_merge.stats.collect import collect_statistics
from lightning_merge.stats.store import load_statistics


@pytest.mark.ddp
def test_ddp_statistics_equal_single_process(tmp_path) -> None:
    run = run_ddp_script("stats_ddp_script.py", tmp_path, timeout=150)
    assert run.returncode == 0, run.stderr[-4000:]
    module = Sources()  # same seeds → same source models
    reference = collect_statistics(
        list(module.sources),
        module.merge_graph,
        module.calibration_dataloader(),
        requires=["moments", "grams"],
        progress=False,
    )
    for name in ("ddp.safetensors", "ddp_padded.safetensors"):
        stats = load_statistics(tmp_path / name, graph=module.merge_graph)
        for space, ref in reference.moments.items():
            got = stats.moments[space]
            assert got.count.item() == ref.count.item() == NUM_SAMPLES * 36  # no sample counted twice
            for field in ("total", "outer"):
                a, b = getattr(got, field), getattr(ref, field)
                assert (a - b).abs().max() <= 1e-9 * b.abs().max(), (name, space, field)
    stats = load_statistics(tmp_path / "ddp.safetensors")
    assert stats.gram_counts == reference.gram_counts  # the callback's second collector, reduced too
    for got, ref in zip(stats.grams, reference.grams, strict=True):
        for layer, b in ref.items():
            assert (got[layer] - b).abs().max() <= 1e-9 * b.abs().max(), layer


def test_shards_are_whole_batches_covering_each_index_once() -> None:
    shards = [list(ShardSampler(11, r, 3, block=2)) for r in range(3)]
    assert shards == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10]]  # batch b on rank b mod 3
    assert [len(ShardSampler(11, r, 3, block=2)) for r in range(3)] == [4, 4, 3]
    padded = [list(DistributedSampler(range(11), num_replicas=3, rank=r, shuffle=False)) for r in range(3)]
    assert len(sum(padded, [])) == 12  # what the pass avoids: one sample repeated
    with pytest.raises(ValueError, match="rank 3"):
        ShardSampler(11, 3, 3, block=2)


def test_without_process_group_the_loader_is_used_as_is() -> None:
    module = Sources()
    loader = DataLoader(torch.randn(5, 1, 6, 6), batch_size=2)
    stats = collect_statistics(list(module.sources), module.merge_graph, loader, progress=False)
    assert stats.moments["c1"].count.item() == 5 * 36


def test_a_gloo_group_is_destroyed_at_exit_once(tmp_path, monkeypatch) -> None:
    """Lightning destroys only NCCL groups at exit; the callback's setup registers the gloo one."""
    import torch.distributed as dist

    from lightning_merge import dataflow as distributed

    hooks: list = []
    monkeypatch.setattr(distributed, "_exit_hook_registered", False)
    monkeypatch.setattr(distributed.atexit, "register", hooks.append)
    assert distributed.destroy_gloo_group_at_exit() is False and hooks == []  # no group yet
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert distributed.destroy_gloo_group_at_exit() is True
        assert distributed.destroy_gloo_group_at_exit() is False and len(hooks) == 1
        hooks[0]()
        assert not dist.is_initialized()
        hooks[0]()  # already gone: a no-op, not an error
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
