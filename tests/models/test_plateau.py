"""The plateau rule and its callback: exact stopping epochs on scripted curves, the recorded curve."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from trained import quiet_trainer

from lightning_merge.models import PlateauRule, PlateauStopping, source_record, train_source
from lightning_merge.models.classifier import SourceClassifier, plateau_scheduler
from lightning_merge.models.training import cache_path, source_key


class ScriptedAccuracy(pl.LightningModule):
    """A tiny model that trains on noise and logs ``curve[epoch]`` as its validation accuracy."""

    def __init__(self, curve: Sequence[float], decay: bool = False) -> None:
        super().__init__()
        self.curve, self.layer, self.decay = list(curve), nn.Linear(2, 1), decay

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.log("val_acc", self.curve[self.current_epoch], on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
        if not self.decay:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": plateau_scheduler(optimizer, 0.01)}


def _fit(curve: Sequence[float], rule: PlateauRule, max_epochs: int, decay: bool = False) -> PlateauStopping:
    loader = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)
    stopper = PlateauStopping(rule)
    trainer = quiet_trainer(max_epochs=max_epochs, callbacks=[stopper], num_sanity_val_steps=0)
    trainer.fit(ScriptedAccuracy(curve, decay), train_dataloaders=loader, val_dataloaders=loader)
    assert trainer.current_epoch == len(stopper.curve)  # epochs actually run
    return stopper


def test_stops_at_the_first_epoch_the_rule_holds() -> None:
    # gains of the last quarter over the best before it: n=4: 5.0, n=5: 6.0, n=6: 1.1, n=7: 0.2 < 0.3
    curve = [0.50, 0.70, 0.80, 0.85, 0.86, 0.861, 0.862, 0.863, 0.99, 0.99]
    stopper = _fit(curve, PlateauRule(min_epochs=4), max_epochs=10)
    assert stopper.curve == pytest.approx(curve[:7])
    record = stopper.record()
    assert record["epochs"] == 7 and record["stopped_by"] == "plateau" and record["plateau_met"]
    assert record["final_val_acc"] == pytest.approx(0.862)
    assert record["last_window_gain_points"] == pytest.approx(0.2, abs=1e-4)  # logged as float32
    assert record["plateau_rule"] == {"min_epochs": 4, "min_gain": 0.3, "window": 0.25}


def test_plateau_decay_stops_only_once_the_rate_is_at_its_floor() -> None:
    # flat curve: the rule holds from epoch 2, but the rate drops ×0.1 after every 3 epochs without
    # a gain (patience 2) until its floor 1e-2 × the initial rate; only then may training stop
    stopper = _fit([0.9] * 20, PlateauRule(min_epochs=2), max_epochs=20, decay=True)
    assert len(stopper.curve) == 8 and stopper.record()["stopped_by"] == "plateau"
    assert stopper.record()["lr_curve"] == pytest.approx([0.01] * 4 + [0.001] * 3 + [0.0001])
    # capped before the floor: the flat curve alone is not convergence, and the record says so
    capped = _fit([0.9] * 20, PlateauRule(min_epochs=2), max_epochs=6, decay=True).record()
    assert capped["stopped_by"] == "max_epochs" and not capped["plateau_met"]
    # without the decay scheduler the same rule stops at once
    assert len(_fit([0.9] * 20, PlateauRule(min_epochs=2), max_epochs=20).curve) == 2


def test_plateau_schedule_is_validated_by_name() -> None:
    with pytest.raises(ValueError, match="schedule must be one of .*'plateau'.*got 'step'"):
        SourceClassifier(arch="mlp", width=0.25, schedule="step")


def test_min_epochs_holds_a_flat_curve_and_max_epochs_caps_a_rising_one() -> None:
    flat = _fit([0.9] * 10, PlateauRule(min_epochs=5), max_epochs=10)
    assert len(flat.curve) == 5 and flat.record()["stopped_by"] == "plateau"
    rising = _fit([0.5 + 0.05 * e for e in range(10)], PlateauRule(min_epochs=2), max_epochs=6)
    record = rising.record()
    assert record["epochs"] == 6 and record["stopped_by"] == "max_epochs" and not record["plateau_met"]
    assert record["last_window_gain_points"] == pytest.approx(10.0, abs=1e-4)  # 2 of 6 epochs: 0.75 - 0.65


@pytest.mark.parametrize(
    ("curve", "window", "epochs", "gain"),
    [([0.1, 0.2], 0.25, 1, 10.0), ([0.1, 0.5, 0.4, 0.45, 0.3], 0.25, 2, -5.0), ([0.2] * 8, 0.5, 4, 0.0)],
)
def test_gain_compares_the_last_window_with_the_best_before(
    curve: list[float], window: float, epochs: int, gain: float
) -> None:
    rule = PlateauRule(min_epochs=2, window=window)
    assert rule.window_epochs(len(curve)) == epochs
    assert rule.gain(curve) == pytest.approx(gain)


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [({"min_epochs": 1}, "min_epochs"), ({"min_gain": -0.1}, "min_gain"), ({"window": 1.0}, "window")],
)
def test_bad_rules_name_the_culprit(kwargs: dict, culprit: str) -> None:
    with pytest.raises(ValueError, match=culprit):
        PlateauRule(**kwargs)


def test_an_unlogged_monitor_is_named() -> None:
    loader = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)
    trainer = quiet_trainer(
        max_epochs=2, callbacks=[PlateauStopping(monitor="val_top1")], num_sanity_val_steps=0
    )
    with pytest.raises(KeyError, match="val_top1"):
        trainer.fit(ScriptedAccuracy([0.5, 0.6]), train_dataloaders=loader, val_dataloaders=loader)


def test_train_source_records_the_curve_beside_the_checkpoint(tmp_path: Path) -> None:
    rule = PlateauRule(min_epochs=2, min_gain=100.0)  # any curve plateaus: stops after min_epochs
    kwargs = {"max_epochs": 4, "limit_train_batches": 3, "lr": 0.05, "plateau": rule}
    model = train_source("mlp", [0, 1], 0, width=0.25, cache_dir=tmp_path, **kwargs)
    path = cache_path(tmp_path, source_key("mlp", [0, 1], 0, width=0.25, **kwargs))
    record = source_record(path)
    assert path.is_file() and record == json.loads(path.with_suffix(".json").read_text())
    assert record["epochs"] == 2 and record["stopped_by"] == "plateau" and record["plateau_met"]
    assert len(record["val_acc_curve"]) == 2 and 0 < record["final_val_acc"] <= 1
    assert record["final_val_acc"] == record["val_acc_curve"][-1]
    assert record["plateau"] == rule.as_dict() and record["val_size"] == 5000
    assert record["epoch_seconds"] == pytest.approx(record["train_seconds"] / 2)
    assert not model.training
    with pytest.raises(ValueError, match="min_epochs"):
        train_source("mlp", [0, 1], 0, width=0.25, cache_dir=tmp_path, **{**kwargs, "max_epochs": 1})
