"""The ``lightning-merge`` CLI: every training config instantiates; a short ``fit`` writes a checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import RichProgressBar

from lightning_merge.cli import main
from lightning_merge.data import TaskSplitDataModule
from lightning_merge.models import SourceClassifier, load_source

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "train").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when ``args=`` and ``sys.argv`` (pytest's own) are both given."""
    monkeypatch.setattr(sys, "argv", ["lightning-merge"])


def _config_in(tmp_path: Path, source: Path, **trainer: object) -> Path:
    """Copy a training config with its output folders moved under ``tmp_path``."""
    text = source.read_text().replace("artifacts/", f"{tmp_path}/artifacts/")
    config = yaml.safe_load(text)
    config["trainer"].update(trainer)
    path = tmp_path / source.name
    path.write_text(yaml.safe_dump(config))
    return path


def test_configs_exist_for_every_architecture_and_task() -> None:
    names = {p.stem for p in CONFIGS}
    expected = {f"{a}_fmnist_task{t}" for a in ("resnet20", "vgg11_bn", "mlp") for t in (0, 1)}
    assert expected <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_instantiates(config: Path, tmp_path: Path) -> None:
    cli = main(args=["--config", str(_config_in(tmp_path, config))], run=False)
    assert isinstance(cli.model, SourceClassifier) and isinstance(cli.datamodule, TaskSplitDataModule)
    # the model is trained on exactly the classes of the task the data module serves
    assert cli.model.classes == cli.datamodule.tasks[cli.datamodule.task]
    assert any(isinstance(c, RichProgressBar) for c in cli.trainer.callbacks)


def test_progress_bar_can_be_disabled(tmp_path: Path) -> None:
    config = _config_in(tmp_path, CONFIGS[0], enable_progress_bar=False)
    cli = main(args=["--config", str(config)], run=False)
    assert not any(isinstance(c, RichProgressBar) for c in cli.trainer.callbacks)


def test_short_fit_writes_a_checkpoint_that_load_source_reloads(tmp_path: Path) -> None:
    limits = {"limit_train_batches": 8, "limit_val_batches": 2, "log_every_n_steps": 4}
    config = _config_in(tmp_path, REPO / "configs/train/mlp_fmnist_task1.yaml", max_epochs=1, **limits)
    args = ["fit", "--config", str(config), "--seed_everything", "3", "--model.init_args.width", "0.5"]
    cli = main(args=args)
    run_dir = tmp_path / "artifacts/train/mlp_fmnist_task1"
    checkpoint = run_dir / "checkpoints/model.ckpt"
    assert checkpoint.is_file()
    assert cli.trainer.global_step == 8
    model = load_source(checkpoint)
    assert model.classes == [5, 6, 7, 8, 9] and model.hparams.arch == "mlp" and model.hparams.width == 0.5
    x = torch.randn(4, 1, 28, 28)
    trained = cli.model.cpu().eval()
    assert torch.allclose(model(x), trained(x))
    header = next(run_dir.glob("logs/version_*/metrics.csv")).read_text().splitlines()[0]
    assert {"val_acc", "val_loss", "train_loss_step", "train_acc_epoch"} <= set(header.split(","))


def test_wrong_task_for_model_raises(tmp_path: Path) -> None:
    """A model trained on task 1's classes fed task 0's data fails with a message naming the labels."""
    config = _config_in(tmp_path, REPO / "configs/train/mlp_fmnist_task1.yaml", limit_train_batches=1)
    with pytest.raises(ValueError, match="not among this model's classes"):
        main(args=["fit", "--config", str(config), "--data.init_args.task", "0", "--trainer.max_epochs", "1"])


def test_module_entry_point_help() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "lightning_merge.cli", "fit", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "--seed_everything" in run.stdout and "--model" in run.stdout


def test_console_entry_leaves_a_gloo_group_to_be_destroyed(monkeypatch) -> None:
    """`lightning-merge fit` has no MergeStatistics callback; the entry point registers the hook."""
    import lightning_merge.cli as cli

    calls: list[str] = []
    monkeypatch.setattr(cli, "main", lambda: calls.append("main"))
    monkeypatch.setattr(cli, "destroy_gloo_group_at_exit", lambda: calls.append("hook") or True)
    cli.run()
    assert calls == ["main", "hook"]


def test_console_entry_imports_the_users_modules_from_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`lightning-merge validate` run in a project folder finds `my_project.models` there (the console
    script, unlike `python -m`, does not put the working directory on sys.path by itself)."""
    import lightning_merge.cli as cli

    (tmp_path / "user_module_in_cwd.py").write_text("VALUE = 7\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    with pytest.raises(ModuleNotFoundError):
        __import__("user_module_in_cwd")
    seen: list[int] = []
    monkeypatch.setattr(cli, "main", lambda: seen.append(__import__("user_module_in_cwd").VALUE))
    monkeypatch.setattr(cli, "destroy_gloo_group_at_exit", lambda: True)
    cli.run()
    assert seen == [7] and sys.path[0] == str(tmp_path)
    sys.modules.pop("user_module_in_cwd", None)
