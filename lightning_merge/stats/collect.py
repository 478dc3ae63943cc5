"""The statistics pass: run the N source models over calibration data with a set of collectors.

Models go to eval mode (BatchNorm uses its running statistics) on one device. The statistics read
off plain forwards (:class:`~lightning_merge.stats.collector.ForwardCollector`: moments, Gram
matrices, joint inputs) share one pass, one forward per model and batch; every other collector
(Fisher, K-FAC: gradients) gets its own pass with only its hooks attached. When a process group is
running, the loader is re-sharded so every sample is seen by exactly one rank, and every collector
state is summed across ranks once, in place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_merge.dataflow import (
    Ranks,
    all_reduce_sum_,
    batch_inputs,
    check_max_batches,
    model_device,
    shard,
)
from lightning_merge.graph.spec import MergeGraph
from lightning_merge.stats.collector import Collector, ForwardCollector, SharedForward
from lightning_merge.stats.container import Statistics
from lightning_merge.stats.registry import statistic_collector

log = logging.getLogger(__name__)


def build_collectors(requires: Iterable[str], graph: MergeGraph) -> list[Collector]:
    """One collector per requested statistic (looked up in the registry), in the given order."""
    names = list(requires)
    if not names:
        raise ValueError("requires is empty: name at least one statistic, e.g. ['moments']")
    if len(set(names)) != len(names):
        raise ValueError(f"requires={names!r} names a statistic twice")
    return [statistic_collector(name).from_graph(graph) for name in names]


def collect_statistics(
    models: Sequence[nn.Module],
    graph: MergeGraph,
    dataloader: Iterable[Any],
    *,
    collectors: Sequence[Collector] | None = None,
    requires: Sequence[str] = ("moments",),
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    ranks: Ranks | None = None,
) -> Statistics:
    """Gather the requested statistics of ``models`` over ``dataloader`` (exact under DDP).

    ``collectors`` overrides ``requires``. Batches are tensors or ``(x, y, ...)`` sequences (the
    first element is the input). ``max_batches`` limits the pass to the first ``max_batches``
    batches of the (unsharded) loader. The models are moved to ``device`` (default: where the
    first one lives); their train/eval modes are restored afterwards. Call it outside inference mode
    (the states are accumulated in place; Fisher and K-FAC need autograd).
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "collect_statistics runs under torch.inference_mode(): its states and Fisher/K-FAC gradients "
            "need normal tensors; call it outside (MergeModule gathers them in setup)"
        )
    ranks = Ranks.current() if ranks is None else ranks
    models = _check_models(models)
    check_max_batches(max_batches)
    collectors = list(collectors) if collectors is not None else build_collectors(requires, graph)
    for c in collectors:
        if not isinstance(c, Collector):
            raise TypeError(f"{type(c).__name__} does not implement the Collector protocol")
    device = torch.device(device) if device is not None else model_device(models[0])
    loader = shard(dataloader, ranks, max_batches=max_batches)
    _check_memory(collectors, models, device, ranks)
    modes = [m.training for m in models]
    try:
        for m in models:
            m.to(device).eval()
        for one_pass in passes(collectors):
            _run(one_pass, models, loader, device, progress and ranks.is_zero, ranks, dataloader)
        stats = Statistics(num_models=len(models), graph_digest=graph.digest())
        for collector in collectors:
            collector.fill(stats)
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)
    return stats


def passes(collectors: Sequence[Collector]) -> list[Collector]:
    """The data passes: every forward-only collector in one shared pass (first, in request order),
    then one pass per other collector."""
    shared = [c for c in collectors if isinstance(c, ForwardCollector)]
    rest = [c for c in collectors if not isinstance(c, ForwardCollector)]
    return ([SharedForward(shared)] if shared else []) + rest


def _check_models(models: Sequence[nn.Module]) -> list[nn.Module]:
    models = list(models)
    if not models:
        raise ValueError("models is empty: the statistics pass needs at least one source model")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{i}] is a {type(m).__name__}, not an nn.Module")
    return models


def _check_memory(
    collectors: Sequence[Collector], models: list[nn.Module], device: torch.device, ranks: Ranks
) -> None:
    """Log each statistic's accumulator size and refuse, before any data pass, statistics whose
    accumulators alone exceed the memory free on ``device`` (else the pass ends in an OOM kill)."""
    sizes = {}
    for c in collectors:
        size = getattr(c, "memory_bytes", None)
        if callable(size):
            sizes[c.name] = size(models)
            if ranks.is_zero:
                log.info("statistics %r: %.1f MiB of accumulators per rank", c.name, sizes[c.name] / 2**20)
    free = available_memory_bytes(device)
    if free is not None and sum(sizes.values()) > free:
        parts = ", ".join(f"{name!r} {b / 2**30:.2f} GiB" for name, b in sizes.items())
        raise MemoryError(
            f"the statistics need {sum(sizes.values()) / 2**30:.2f} GiB of float64 accumulators ({parts}), "
            f"more than the {free / 2**30:.2f} GiB free on {device}: merge on a device with more memory, "
            "or ask for fewer statistics (e.g. PLeaS' joint_inputs grow with (N·channels·kernel)² per layer)"
        )


def available_memory_bytes(device: torch.device) -> int | None:
    """Memory free for new allocations on ``device``: CUDA's free memory, Linux's MemAvailable for the
    CPU; None where it cannot be read (no check then)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _run(
    collector: Collector,
    models: list[nn.Module],
    loader: Iterable[Any],
    device: torch.device,
    progress: bool,
    ranks: Ranks,
    original: Iterable[Any],
) -> None:
    """One pass of ``collector`` over this rank's batches, then the in-place cross-rank sum."""
    collector.attach(models)
    samples = torch.zeros((), dtype=torch.float64, device=device)
    bar = _progress_bar(collector.name, loader, progress)
    try:
        with torch.enable_grad(), bar as advance:
            for batch in loader:
                inputs = batch_inputs(batch).to(device, non_blocking=True)
                collector.step(models, inputs)
                samples += inputs.shape[0]
                advance()
    finally:
        collector.detach()
    all_reduce_sum_([*collector.states(), samples], ranks)
    gather = getattr(collector, "gather", None)  # states kept as rows (not sums) are stacked instead
    if callable(gather):
        gather(ranks)
    if samples.item() == 0:
        raise ValueError(f"the calibration dataloader {original!r} yielded no samples")


class _progress_bar:
    """A transient rich progress bar (rank zero only), or nothing."""

    def __init__(self, name: str, loader: Iterable[Any], enabled: bool) -> None:
        try:
            total: int | None = len(loader)  # type: ignore[arg-type]
        except TypeError:
            total = None
        self.total, self.name, self.enabled = total, name, enabled
        self.bar: Any = None

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.bar.start()
        task = self.bar.add_task(f"statistics: {self.name}", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
