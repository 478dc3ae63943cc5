"""2-process CPU DDP run of the MergeStatistics callback (launched by tests/test_stats_ddp.py).

Usage: python stats_ddp_script.py OUT_DIR. Rank 0 writes OUT_DIR/ddp.safetensors (moments and
Gram matrices from the callback inside ``trainer.validate``) and OUT_DIR/ddp_padded.safetensors
(``collect_statistics`` over a loader with a padding ``DistributedSampler``, which the pass must
re-shard).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from ddp_launch import ddp_trainer
from stats_nets import ConvNet, conv_graph, make_models
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_merge.callbacks.statistics import MergeStatistics, StatisticsInputs
from lightning_merge.stats.collect import collect_statistics
from lightning_merge.stats.store import save_statistics

NUM_SAMPLES = 1001  # odd: two ranks cannot split it evenly
BATCH_SIZE = 64


def calibration_data() -> TensorDataset:
    g = torch.Generator().manual_seed(123)
    return TensorDataset(torch.randn(NUM_SAMPLES, 1, 6, 6, generator=g), torch.zeros(NUM_SAMPLES))


class Sources(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.sources = nn.ModuleList(make_models(ConvNet, n=2))
        self.merge_graph = conv_graph(self.sources[0])
        self.statistics = None

    def statistics_inputs(self) -> StatisticsInputs:
        return StatisticsInputs(list(self.sources), self.merge_graph, self.calibration_dataloader())

    def calibration_dataloader(self) -> DataLoader:
        return DataLoader(calibration_data(), batch_size=BATCH_SIZE)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.zeros(4, 1), batch_size=2)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        return None

    test_dataloader = val_dataloader
    test_step = validation_step


def main(out: Path) -> None:
    module = Sources()
    trainer = ddp_trainer(MergeStatistics(requires=["moments", "grams"], progress=False))
    trainer.validate(module)
    assert dist.is_initialized() and dist.get_world_size() == 2
    if trainer.is_global_zero:
        save_statistics(module.statistics, out / "ddp.safetensors")
    data = calibration_data()
    padded = DataLoader(data, batch_size=BATCH_SIZE, sampler=DistributedSampler(data, shuffle=False))
    stats = collect_statistics(list(module.sources), module.merge_graph, padded, progress=False)
    if trainer.is_global_zero:
        save_statistics(stats, out / "ddp_padded.safetensors")
    trainer.strategy.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
