"""Exact distributed statistics: unpadded sharding of the calibration data and one in-place sum.

``DistributedSampler`` pads every rank to the same length by repeating samples, so sums gathered
under it count some samples twice. Here each sample goes to exactly one rank (rank ``r`` takes
indices ``r, r + W, r + 2W, ...``), and each accumulated state is all-reduced once, in place, so the
summed statistics equal a single-process run over the same data.
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, Sampler

log = logging.getLogger(__name__)


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_exit_hook_registered = False


def destroy_gloo_group_at_exit() -> bool:
    """Destroy a running gloo process group at interpreter exit (once; True when registered now).

    Lightning registers this for NCCL only; a gloo group left to interpreter finalisation can abort
    every rank with "terminate called without an active exception" (pytorch/pytorch#190489).
    """
    global _exit_hook_registered
    if _exit_hook_registered or not (dist.is_available() and dist.is_initialized()):
        return False
    if dist.get_backend() != "gloo":
        return False
    atexit.register(_destroy_if_initialized)
    _exit_hook_registered = True
    return True


def _destroy_if_initialized() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_rank_zero() -> bool:
    return rank_and_world()[0] == 0


class UnpaddedShardSampler(Sampler[int]):
    """Indices ``rank, rank + W, ...`` below ``length``: every index on exactly one rank, no padding.

    Same split as Lightning's ``UnrepeatedDistributedSampler`` (kept here so ``stats`` does not
    import Lightning); ranks may get one sample more or less than each other.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, {world_size})")
        self.length, self.rank, self.world_size = length, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))


def shard_dataloader(loader: DataLoader, *, max_samples: int | None = None) -> DataLoader:
    """The same loader over this rank's unpadded shard of the first ``max_samples`` samples.

    Returns ``loader`` unchanged when not distributed. Any sampler (``DistributedSampler`` with
    padding, random, sequential) is replaced: sums do not depend on the order.
    """
    if not is_distributed():
        return loader
    if not isinstance(loader, DataLoader):
        raise TypeError(f"distributed statistics need a torch DataLoader, got {type(loader).__name__}")
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            "the calibration dataloader wraps an IterableDataset, which cannot be sharded without "
            "padding or duplication across ranks; use a map-style dataset"
        )
    if loader.batch_size is None:
        raise ValueError(
            "the calibration dataloader uses a custom batch_sampler; distributed statistics re-shard "
            "the data, so give it a batch_size instead"
        )
    if loader.drop_last:
        raise ValueError(
            "the calibration dataloader has drop_last=True; each rank would drop a different tail, "
            "so the distributed statistics would not cover a well-defined set of samples"
        )
    rank, world = rank_and_world()
    length = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    sampler = UnpaddedShardSampler(length, rank, world)
    return DataLoader(
        dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
    )


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Sum every tensor across ranks in place (one all-reduce each, no gathered copies)."""
    if not is_distributed():
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
