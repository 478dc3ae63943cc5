"""2-process CPU DDP run of PLeaS' statistics (launched by tests/test_pleas.py).

Usage: python pleas_ddp_script.py OUT_DIR. The MergeStatistics callback gathers the feature moments
and the joint layer-input moments inside ``trainer.validate`` (whole batches sharded over 2 gloo
ranks, summed once); rank 0 merges with PLeaS (published objective, w = 1.5) and saves the merged
weights to OUT_DIR/pleas_ddp.safetensors. With $PLEAS_DDP_ROWS_ABOVE set, that is the joint width
above which a Linear keeps its rows (400: the flattened fc's 2·216), so the ranks' rows are stacked.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from ddp_launch import ddp_trainer
from safetensors.torch import save_file
from stats_nets import ConvNet, make_models
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_merge.callbacks.statistics import MergeStatistics, StatisticsInputs
from lightning_merge.graph import trace_graph
from lightning_merge.methods import PLeaSMerge
from lightning_merge.stats import joint_inputs
from lightning_merge.stats.container import JointRows

NUM_SAMPLES = 301  # odd: two ranks cannot split it evenly
BATCH_SIZE = 32
METHOD = PLeaSMerge(width=1.5)


class PLeaSSources(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.sources = nn.ModuleList(make_models(ConvNet, n=2))
        self.merge_graph = trace_graph(self.sources[0], torch.zeros(2, 1, 6, 6))
        self.statistics = None

    def statistics_inputs(self) -> StatisticsInputs:
        return StatisticsInputs(list(self.sources), self.merge_graph, self.calibration_dataloader())

    def calibration_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(321)
        data = TensorDataset(torch.randn(NUM_SAMPLES, 1, 6, 6, generator=g), torch.zeros(NUM_SAMPLES))
        return DataLoader(data, batch_size=BATCH_SIZE)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(torch.zeros(4, 1), batch_size=2)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        return None

    def merged_state(self) -> dict[str, torch.Tensor]:
        sources = [s.eval() for s in self.sources]
        result = METHOD.merge(sources, graph=self.merge_graph, stats=self.statistics)
        return {k: v.detach().contiguous() for k, v in result.model.state_dict().items()}


def main(out: Path) -> None:
    if "PLEAS_DDP_ROWS_ABOVE" in os.environ:
        joint_inputs.ROWS_ABOVE = int(os.environ["PLEAS_DDP_ROWS_ABOVE"])
    module = PLeaSSources()
    trainer = ddp_trainer(MergeStatistics(requires=sorted(METHOD.requires), progress=False))
    trainer.validate(module)
    assert dist.is_initialized() and dist.get_world_size() == 2
    kept = module.statistics.joint_inputs["fc"]
    assert isinstance(kept, JointRows) == ("PLEAS_DDP_ROWS_ABOVE" in os.environ), type(kept)
    assert float(kept.count) == NUM_SAMPLES  # every rank's rows (or sums), once
    if trainer.is_global_zero:
        save_file(module.merged_state(), str(out / "pleas_ddp.safetensors"))
    trainer.strategy.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
