"""Data passes across ranks: the one sharding rule, the one exact sum, batch inputs and devices.

Every pass of the library over data (statistics, BatchNorm reset, REPAIR, least-squares refits,
evaluation) shards the same way and sums the same way, so a run on W processes gives the numbers of
one process:

* **sharding** (:func:`shard`): whole batches, batch ``b`` of the unsharded loader on rank
  ``b mod W``, no padding and no repeats. Whole batches matter for passes in train mode (BatchNorm
  normalises by its batch) and cost nothing for sums, whose grouping only changes float64 rounding.
* **sum** (:func:`all_reduce_sum_`): each accumulated tensor summed across ranks in place, once.
  Under Lightning the sum goes through the strategy (``Ranks.of_strategy``); from plain Python it uses
  the default ``torch.distributed`` group when one is running.

This module sits below every other one of the package (it imports none of them, nor Lightning).
"""

from __future__ import annotations

import atexit
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

ReduceSum = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Ranks:
    """Who this process is among the ranks of a pass, and how it sums a tensor over all of them.

    ``reduce_sum(t)`` returns the sum of ``t`` over ranks (it may work in place); ``None`` means the
    default ``torch.distributed`` group.
    """

    rank: int = 0
    world: int = 1
    reduce_sum: ReduceSum | None = None

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside [0, {self.world})")

    @classmethod
    def current(cls) -> Ranks:
        """The default process group's ranks; one rank when none is running."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @classmethod
    def of_strategy(cls, strategy: Any) -> Ranks:
        """A Lightning strategy's ranks, summing through ``strategy.reduce(t, reduce_op="sum")``."""
        world = int(strategy.world_size)
        reduce = None if world == 1 else (lambda t: strategy.reduce(t, reduce_op="sum"))
        return cls(int(strategy.global_rank), world, reduce)

    @property
    def is_zero(self) -> bool:
        return self.rank == 0


def all_reduce_sum_(tensors: Sequence[torch.Tensor], ranks: Ranks | None = None) -> None:
    """Sum every tensor over the ranks, in place (one collective per tensor, no gathered copies)."""
    ranks = Ranks.current() if ranks is None else ranks
    if ranks.world == 1:
        return
    for tensor in tensors:
        if ranks.reduce_sum is None:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            continue
        total = ranks.reduce_sum(tensor)
        if total is not tensor:
            tensor.copy_(total)


def all_gather_rows(rows: torch.Tensor, ranks: Ranks | None = None) -> torch.Tensor:
    """Every rank's (n_r, d) rows stacked in rank order, on every rank, by two sum-reductions: the
    row counts, then each rank's rows in its own slot of a zero tensor (adding zeros is exact, and
    a strategy's sum is all it takes; ranks may hold different row counts)."""
    ranks = Ranks.current() if ranks is None else ranks
    if ranks.world == 1:
        return rows
    counts = torch.zeros(ranks.world, dtype=torch.float64, device=rows.device)
    counts[ranks.rank] = rows.shape[0]
    all_reduce_sum_([counts], ranks)
    sizes = [int(c) for c in counts.tolist()]
    out = rows.new_zeros(sum(sizes), *rows.shape[1:])
    start = sum(sizes[: ranks.rank])
    out[start : start + rows.shape[0]] = rows
    all_reduce_sum_([out], ranks)
    return out


class ShardSampler(DistributedSampler):
    """Indices of the whole batches ``rank, rank + W, rank + 2W, ...`` of the first ``length`` samples.

    A ``DistributedSampler`` so that Lightning keeps it instead of injecting its padding one. With the
    loader's own ``batch_size`` these indices form exactly the unsharded loader's batches.
    """

    def __init__(self, length: int, rank: int, world: int, block: int) -> None:
        if length < 0 or block < 1:
            raise ValueError(f"length must be >= 0 and block >= 1, got {length}, {block}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside [0, {world})")
        self.length, self.rank, self.num_replicas, self.block = length, rank, world, block
        self.shuffle, self.drop_last, self.epoch, self.seed = False, False, 0, 0
        self.num_samples = sum(1 for _ in self._indices())
        self.total_size = length

    def _indices(self) -> Iterator[int]:
        starts = range(self.rank * self.block, self.length, self.num_replicas * self.block)
        return itertools.chain.from_iterable(range(s, min(s + self.block, self.length)) for s in starts)

    def __iter__(self) -> Iterator[int]:
        return self._indices()

    def __len__(self) -> int:
        return self.num_samples


def check_max_batches(max_batches: object) -> int | None:
    """``max_batches`` itself when it is None or a positive int; every pass that reads data checks it
    through here, up front, so a bad value fails before any work with one message."""
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    return max_batches


def shard(
    loader: Iterable[Any], ranks: Ranks | None = None, *, max_batches: int | None = None
) -> Iterable[Any]:
    """This rank's whole batches of the first ``max_batches`` batches of ``loader`` (all when None).

    One rank: the loader itself, cut after ``max_batches``. Several: a map-style ``DataLoader`` with a
    ``batch_size`` is re-sampled by :class:`ShardSampler`; anything else is refused, since it cannot be
    split without repeating or dropping samples.
    """
    ranks = Ranks.current() if ranks is None else ranks
    check_max_batches(max_batches)
    if ranks.world == 1:
        return loader if max_batches is None else _Limited(loader, max_batches)
    _check_shardable(loader)
    assert isinstance(loader, DataLoader) and loader.batch_size is not None
    length = len(loader.dataset)  # type: ignore[arg-type]
    if max_batches is not None:
        length = min(length, max_batches * loader.batch_size)
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=ShardSampler(length, ranks.rank, ranks.world, loader.batch_size),
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


def _check_shardable(loader: Any) -> None:
    if not isinstance(loader, DataLoader):
        raise TypeError(f"a pass over several ranks needs a torch DataLoader, got {type(loader).__name__}")
    if isinstance(loader.dataset, IterableDataset):
        raise ValueError(
            "the dataloader wraps an IterableDataset, which cannot be sharded across ranks without "
            "repeating or dropping samples; use a map-style dataset"
        )
    if loader.batch_size is None:
        raise ValueError(
            "the dataloader uses a custom batch_sampler; a pass over several ranks re-shards the data by "
            "whole batches, so give it a batch_size instead"
        )
    if loader.drop_last:
        raise ValueError(
            "the dataloader has drop_last=True; the ranks together would not cover a well-defined set of "
            "samples, so use drop_last=False"
        )


class _Limited:
    """The first ``limit`` batches of a loader (``len`` included, for progress bars)."""

    def __init__(self, loader: Iterable[Any], limit: int) -> None:
        self.loader, self.limit = loader, limit

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(self.loader, self.limit)

    def __len__(self) -> int:
        return min(len(self.loader), self.limit)  # type: ignore[arg-type]


def batch_inputs(batch: Any) -> torch.Tensor:
    """The input tensor of a batch: the batch, its first entry, or ``batch["inputs"]``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("inputs"), torch.Tensor):
        return batch["inputs"]
    raise TypeError(
        f"cannot find the inputs in a batch of type {type(batch).__name__}; "
        "expected a tensor, an (inputs, targets) tuple or a dict with 'inputs'"
    )


def model_device(model: nn.Module) -> torch.device:
    """Where a model's first parameter (or buffer) lives; CPU for a model without tensors."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def sharded_inputs(
    loader: Iterable[Any], device: torch.device, ranks: Ranks | None = None, *, max_batches: int | None = None
) -> Iterator[torch.Tensor]:
    """This rank's batches' inputs, on ``device``."""
    for batch in shard(loader, ranks, max_batches=max_batches):
        yield batch_inputs(batch).to(device, non_blocking=True)


def local_batches(
    loader: Iterable[Any],
    device: torch.device,
    ranks: Ranks | None = None,
    *,
    max_batches: int | None = None,
    what: str = "this pass",
) -> list[torch.Tensor]:
    """This rank's inputs as a list (for passes that revisit batches), never empty."""
    batches = list(sharded_inputs(loader, device, ranks, max_batches=max_batches))
    if not batches:
        world = (Ranks.current() if ranks is None else ranks).world
        raise ValueError(
            f"{what} got no batches on this rank: the data loader is empty"
            + (
                f" or has fewer batches than the {world} ranks (use a smaller batch size)"
                if world > 1
                else ""
            )
        )
    return batches


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
