"""Training a source until its validation accuracy plateaus, and recording the curve that says so.

Users merge converged models, so the benchmark sources are trained to a plateau instead of a fixed
epoch count. The rule (:class:`PlateauRule`): after at least ``min_epochs`` epochs, stop once the best
validation accuracy of the last ``window`` fraction of the epochs (at least one epoch) is less than
``min_gain`` percentage points above the best accuracy before them. :class:`PlateauStopping` applies it
through Lightning's public callback API and keeps the per-epoch curve for the source's records.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
from torch.optim.lr_scheduler import ReduceLROnPlateau


@dataclass(frozen=True)
class PlateauRule:
    """When a validation curve counts as converged (accuracies as fractions, gain in points)."""

    min_epochs: int = 8
    min_gain: float = 0.3
    window: float = 0.25

    def __post_init__(self) -> None:
        if isinstance(self.min_epochs, bool) or not isinstance(self.min_epochs, int) or self.min_epochs < 2:
            raise ValueError(f"PlateauRule.min_epochs must be an int >= 2, got {self.min_epochs!r}")
        if not (isinstance(self.min_gain, (int, float)) and self.min_gain >= 0):
            raise ValueError(f"PlateauRule.min_gain must be >= 0 points, got {self.min_gain!r}")
        if not (isinstance(self.window, (int, float)) and 0 < self.window < 1):
            raise ValueError(f"PlateauRule.window must be a fraction in (0, 1), got {self.window!r}")

    def window_epochs(self, epochs: int) -> int:
        """Epochs in the last ``window`` fraction of ``epochs`` (at least 1, leaving at least 1 before)."""
        return min(max(1, math.ceil(self.window * epochs)), epochs - 1)

    def gain(self, curve: Sequence[float]) -> float:
        """Points gained by the last window over the best epoch before it (NaN below 2 epochs)."""
        if len(curve) < 2:
            return math.nan
        k = self.window_epochs(len(curve))
        return 100.0 * (max(curve[-k:]) - max(curve[:-k]))

    def plateaued(self, curve: Sequence[float]) -> bool:
        """Whether ``curve`` (validation accuracy per epoch, as fractions) meets the rule."""
        return len(curve) >= self.min_epochs and self.gain(curve) < self.min_gain

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PlateauStopping(pl.Callback):
    """Stop ``fit`` when ``monitor`` (a logged validation accuracy, as a fraction) meets ``rule``.

    ``curve`` holds the monitored value of every validation epoch (sanity checks excluded);
    :meth:`record` is what a source's cache metadata and the results files keep.
    """

    def __init__(self, rule: PlateauRule | None = None, monitor: str = "val_acc") -> None:
        super().__init__()
        self.rule = rule if rule is not None else PlateauRule()
        if not isinstance(self.rule, PlateauRule):
            raise TypeError(f"rule must be a PlateauRule, got {type(rule).__name__}")
        self.monitor = monitor
        self.curve: list[float] = []
        self.lr_curve: list[float] = []
        #: whether the last epoch's rate was final (every plateau-decay scheduler at its floor)
        self.settled = True
        self.stopped_at: int | None = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            logged = sorted(trainer.callback_metrics)
            raise KeyError(
                f"PlateauStopping monitors {self.monitor!r}, which was not logged (logged: {logged})"
            )
        self.curve.append(float(value))
        self.lr_curve.append(max(g["lr"] for g in trainer.optimizers[0].param_groups))
        self.settled = decay_finished(trainer)
        if self.stopped_at is None and self.converged():
            self.stopped_at = len(self.curve)
            trainer.should_stop = True

    def converged(self) -> bool:
        """The stop criterion: the rule holds on the curve and the rate has no drop left."""
        return self.settled and self.rule.plateaued(self.curve)

    def record(self) -> dict[str, Any]:
        """Epochs run, the curve, the final accuracy, whether (and why) training stopped."""
        return {
            "epochs": len(self.curve),
            "val_acc_curve": list(self.curve),
            "final_val_acc": self.curve[-1] if self.curve else None,
            "last_window_gain_points": self.rule.gain(self.curve) if len(self.curve) >= 2 else None,
            "plateau_met": self.converged(),
            "stopped_by": "plateau" if self.stopped_at is not None else "max_epochs",
            "lr_curve": list(self.lr_curve),
            "plateau_rule": self.rule.as_dict(),
            "monitor": self.monitor,
        }

    def state_dict(self) -> dict[str, Any]:
        state = {"curve": list(self.curve), "lr_curve": list(self.lr_curve), "settled": self.settled}
        return state | {"stopped_at": self.stopped_at}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curve = [float(v) for v in state_dict.get("curve", [])]
        self.lr_curve = [float(v) for v in state_dict.get("lr_curve", [])]
        self.settled = bool(state_dict.get("settled", True))
        self.stopped_at = state_dict.get("stopped_at")


def decay_finished(trainer: pl.Trainer) -> bool:
    """Whether every plateau-decay scheduler (``ReduceLROnPlateau``) has reached its floor rate: a
    flat curve at a rate that would still drop is a stall of that rate, not convergence. True when
    there is no such scheduler (fixed-length schedules: the rule alone decides)."""
    for config in trainer.lr_scheduler_configs:
        scheduler = config.scheduler
        if isinstance(scheduler, ReduceLROnPlateau):
            lrs = [g["lr"] for g in scheduler.optimizer.param_groups]
            if any(lr > floor * (1 + 1e-6) for lr, floor in zip(lrs, scheduler.min_lrs, strict=True)):
                return False
    return True
