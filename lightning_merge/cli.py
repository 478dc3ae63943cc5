"""``lightning-merge``: a ``LightningCLI`` (fit / validate / test / predict) over any LightningModule.

Models and data modules are chosen by class path, so every module of the library (and the user's
own) works from YAML::

    lightning-merge fit --config configs/train/resnet20_fmnist_task0.yaml --seed_everything 1
    lightning-merge fit --model lightning_merge.models.SourceClassifier --model.arch mlp \
        --data lightning_merge.data.TaskSplitDataModule --data.task 0

A ``RichProgressBar`` is used unless the configuration brings its own progress bar or disables it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_merge.dataflow import destroy_gloo_group_at_exit


class MergeCLI(LightningCLI):
    """LightningCLI with subclass-mode model/data, a rich progress bar and a checkpoint report."""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = (
            self.config_init.get(self.subcommand, self.config_init) if self.subcommand else self.config_init
        )
        trainer_config = config.get("trainer") or {}
        callbacks = kwargs.get("callbacks", trainer_config.get("callbacks")) or []
        callbacks = list(callbacks) if isinstance(callbacks, list | tuple) else [callbacks]
        wants_bar = trainer_config.get("enable_progress_bar", True) is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs["callbacks"] = [*callbacks, RichProgressBar()]
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        """Say where the checkpoint went (the path ``load_source`` / a merge config needs)."""
        checkpoint = self.trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.last_model_path:
            rank_zero_info(f"last checkpoint: {checkpoint.last_model_path}")
        elif isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_path:
            rank_zero_info(f"checkpoint: {checkpoint.best_model_path}")


def main(args: list[str] | None = None, run: bool = True) -> MergeCLI:
    """Entry point of the ``lightning-merge`` console script (``args=None`` reads ``sys.argv``).

    W&B runs are offline unless ``WANDB_MODE`` says otherwise (``wandb sync`` uploads them later).
    """
    os.environ.setdefault("WANDB_MODE", "offline")
    return MergeCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def import_from_working_directory() -> None:
    """Put the working directory first on ``sys.path``, as ``python -m lightning_merge.cli`` does: the
    console script alone would not, and a user's classes named in a YAML (``my_project.models.UserNet``)
    usually live in the project folder the command runs from."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def run() -> None:
    """Console-script entry: runs the CLI and exits 0 (``main`` returns the CLI object for tests).

    The user's modules import from the working directory (:func:`import_from_working_directory`).
    Every subcommand (``fit`` too, which has no statistics callback) leaves a CPU DDP (gloo) group to
    be destroyed before the interpreter goes; see :func:`destroy_gloo_group_at_exit`.
    """
    import_from_working_directory()
    main()
    destroy_gloo_group_at_exit()


if __name__ == "__main__":
    run()
