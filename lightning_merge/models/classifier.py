"""``SourceClassifier``: the LightningModule that trains one source model on one task.

Every argument is a flat, typed value so that ``save_hyperparameters`` + ``load_from_checkpoint``
rebuild the model and LightningCLI can set each one from YAML or the command line. The network
itself is ``self.model`` (a plain ``nn.Module`` with a ``.head``) — that is what merging consumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from lightning_merge.models.heads import joint_predict, scatter_to_global
from lightning_merge.models.registry import build_model

SCHEDULES = ("onecycle", "cosine", "constant", "plateau")
#: ``schedule="plateau"``: the learning rate drops ×``PLATEAU_FACTOR`` when ``val_acc`` has not risen
#: for ``PLATEAU_PATIENCE`` + 1 epochs, down to ``PLATEAU_FLOOR`` × the initial rate (two drops).
PLATEAU_FACTOR, PLATEAU_PATIENCE, PLATEAU_FLOOR = 0.1, 2, 1e-2


def plateau_scheduler(optimizer: torch.optim.Optimizer, lr: float) -> dict:
    """Lightning's scheduler config for step decay on a validation plateau (a schedule with no fixed
    length, so training to convergence is decided by the curve, not by a cap: see
    :class:`~lightning_merge.models.plateau.PlateauStopping`)."""
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="max",
        factor=PLATEAU_FACTOR,
        patience=PLATEAU_PATIENCE,
        min_lr=lr * PLATEAU_FLOOR,
    )
    return {"scheduler": scheduler, "monitor": "val_acc", "interval": "epoch", "strict": True}


class SourceClassifier(pl.LightningModule):
    """A classifier trained with cross-entropy over its own ``classes`` only.

    Targets are global labels remapped to positions in ``classes``. With the embedding head the logits
    of the model's own class embeddings are used (the head still scores all ``num_classes``); with the
    linear head the head has exactly ``len(classes)`` outputs. Optimiser: SGD + Nesterov momentum with
    a one-cycle (or cosine) learning-rate schedule, which reaches > 90 % task accuracy in 1–2 epochs;
    ``optimizer="adamw"`` (``momentum``/``nesterov`` unused) for the ViT, whose one-cycle schedule is
    the usual linear warmup + cosine decay with AdamW's betas left fixed. ``schedule="plateau"``
    (converged sources) decays the rate in steps when the validation accuracy stalls; it needs a
    validation set.
    """

    def __init__(
        self,
        arch: str = "resnet20",
        width: float = 1.0,
        in_channels: int = 1,
        image_size: int = 28,
        head: Literal["embedding", "linear"] = "embedding",
        classes: list[int] | None = None,
        num_classes: int = 10,
        embed_dim: int = 32,
        lr: float = 0.1,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        nesterov: bool = True,
        schedule: Literal["onecycle", "cosine", "constant", "plateau"] = "onecycle",
        warmup_fraction: float = 0.2,
        label_smoothing: float = 0.0,
        optimizer: Literal["sgd", "adamw"] = "sgd",
    ) -> None:
        super().__init__()
        classes = list(range(num_classes)) if classes is None else [int(c) for c in classes]
        if not classes or len(set(classes)) != len(classes) or not all(0 <= c < num_classes for c in classes):
            raise ValueError(f"classes must be distinct ids in [0, {num_classes}), got {classes}")
        if head not in ("embedding", "linear"):
            raise ValueError(f"head must be 'embedding' or 'linear', got {head!r}")
        for name, value in [("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum)]:
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0 (got momentum=0)")
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        if not 0 < warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in (0, 1), got {warmup_fraction}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.save_hyperparameters()
        self.classes = classes
        self.num_classes = num_classes
        self.head_kind = head
        self.model = build_model(
            arch,
            in_channels=in_channels,
            width=width,
            head=head,
            num_classes=num_classes if head == "embedding" else len(classes),
            embed_dim=embed_dim,
            image_size=image_size,
        )
        position = torch.full((num_classes,), -1, dtype=torch.long)
        position[classes] = torch.arange(len(classes))
        self.register_buffer("class_ids", torch.tensor(classes), persistent=False)
        self.register_buffer("label_to_position", position, persistent=False)
        self.train_acc = MulticlassAccuracy(num_classes=len(classes), average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=len(classes), average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=len(classes), average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # ------------------------------------------------------------------ label spaces
    def own_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over this model's own classes, in the order of ``classes``."""
        return logits.index_select(-1, self.class_ids) if self.head_kind == "embedding" else logits

    def joint_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits at global class positions (linear head: ``-inf`` for classes outside its task)."""
        if self.head_kind == "embedding":
            return logits
        return scatter_to_global(logits, self.classes, self.num_classes)

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Global labels → positions in ``classes``; a label outside the task raises."""
        positions = self.label_to_position[labels]
        if bool((positions < 0).any()):
            bad = sorted(set(labels[positions < 0].tolist()))
            raise ValueError(f"labels {bad} are not among this model's classes {self.classes}")
        return positions

    @staticmethod
    def joint_predict(models: Sequence[SourceClassifier], x: torch.Tensor) -> torch.Tensor:
        """Joint global prediction of several source models (argmax over their concatenated heads)."""
        return joint_predict([m.joint_logits(m(x)) for m in models])

    # ------------------------------------------------------------------ steps
    def _step(
        self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metric: MulticlassAccuracy
    ) -> torch.Tensor:
        images, labels = batch
        logits = self.own_logits(self(images))
        targets = self.targets(labels)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        metric(logits, targets)
        on_step = stage == "train"
        self.log(f"{stage}_loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(f"{stage}_acc", metric, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_acc)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test", self.test_acc)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Global class ids predicted by this model alone."""
        return self.joint_logits(self(batch[0])).argmax(-1)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):  # noqa: ANN201  (Lightning's union of return types)
        hp = self.hparams
        adamw = hp.get("optimizer", "sgd") == "adamw"
        if adamw:
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.SGD(
                self.parameters(),
                lr=hp.lr,
                momentum=hp.momentum,
                weight_decay=hp.weight_decay,
                nesterov=hp.nesterov,
            )
        if hp.schedule == "constant":
            return optimizer
        if hp.schedule == "plateau":
            return {"optimizer": optimizer, "lr_scheduler": plateau_scheduler(optimizer, hp.lr)}
        total = int(self.trainer.estimated_stepping_batches)
        if hp.schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=hp.lr,
                total_steps=max(total, 2),
                pct_start=hp.warmup_fraction,
                cycle_momentum=not adamw,
            )
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
