"""A Lightning user's own models and data, merged by ``lightning-merge validate``, no change to the library.

The user's code (a LightningModule, a Dataset with local labels 0..4, a LightningDataModule) is written
by this test into a folder outside the package, trained a few steps (one pair through the user's own
``LightningCLI``, one pair by a plain ``Trainer`` + ``ModelCheckpoint``), and each pair is merged from a
YAML config: sources as ``{path, attribute, constructor, classes}`` and tasks as ``DatasetTasks``. A
torchvision ResNet-18 pair from state-dict / safetensors files is merged the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_merge.pipeline.export import load_merged

pytestmark = pytest.mark.slow  # trains 4 small models and runs 3 merges in subprocesses (~6 min on 2 CPUs)

REPO = Path(__file__).resolve().parents[1]
TASKS = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]

USER_CODE = '''
"""A user's own models and data (not part of lightning_merge)."""
import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_merge.data import load_split

ROOT = "/usr/share/datasets/fashion-mnist"


class FashionTask(Dataset):
    """Fashion-MNIST images of `classes`, labelled 0..len(classes)-1 (the user's label space)."""

    def __init__(self, classes: list[int], train: bool = True, limit: int = 2000, channels: int = 1):
        images, labels = load_split(ROOT, train=train)
        keep = torch.isin(labels, torch.tensor(classes)).nonzero().squeeze(1)[:limit]
        x = images[keep].float().div(255).sub(0.286).div(0.353)
        self.x = x.unsqueeze(1).expand(-1, channels, -1, -1)
        self.y = torch.searchsorted(torch.tensor(sorted(classes)), labels[keep])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class FashionTaskData(pl.LightningDataModule):
    def __init__(self, classes: list[int], batch_size: int = 64, limit: int = 2000):
        super().__init__()
        self.classes, self.batch_size, self.limit = classes, batch_size, limit

    def train_dataloader(self):
        data = FashionTask(self.classes, True, self.limit)
        return DataLoader(data, batch_size=self.batch_size, shuffle=True)

    def test_dataloader(self):
        return DataLoader(FashionTask(self.classes, False, 500), batch_size=250)


class UserNet(pl.LightningModule):
    def __init__(self, hidden: int = 48, outputs: int = 5, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, outputs),
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
'''

CLI_TRAIN = """
from lightning.pytorch.cli import LightningCLI
LightningCLI(subclass_mode_model=True, subclass_mode_data=True)
"""

PLAIN_TRAIN = """
import sys
import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from user_models import FashionTaskData, UserNet

for i, classes in enumerate([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]):
    pl.seed_everything(10 + i)
    checkpoint = ModelCheckpoint(dirpath=sys.argv[1], filename=f"plain{i}")
    trainer = pl.Trainer(max_steps=60, logger=False, enable_progress_bar=False, accelerator="cpu",
                         callbacks=[checkpoint], enable_model_summary=False)
    trainer.fit(UserNet(hidden=48), datamodule=FashionTaskData(classes))
"""


def run(args: list[str], cwd: Path, user: Path | None = None) -> subprocess.CompletedProcess:
    """``args`` in ``cwd`` with the user's code folder (default ``cwd``) importable."""
    path = os.pathsep.join([str(user or cwd), str(REPO)])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def task_data(
    classes: list[int], name: str, channels: int = 1, as_datamodule: bool = False, test_size: int = 500
) -> dict:
    """A ``TaskData`` entry of the YAML: the user's dataset (or data module) with its global ids."""
    if as_datamodule:
        return {
            "name": name,
            "classes": classes,
            "datamodule": {
                "class_path": "user_models.FashionTaskData",
                "init_args": {"classes": classes, "limit": 300},
            },
        }
    data = {"class_path": "user_models.FashionTask", "init_args": {"classes": classes, "channels": channels}}
    return {
        "name": name,
        "classes": classes,
        "test": data | {"init_args": data["init_args"] | {"train": False, "limit": test_size}},
        "calibration": data | {"init_args": data["init_args"] | {"limit": 300}},
    }


#: ZipIt! up to the heads' input: each source keeps its own linear head (concatenated heads).
ZIP_TO_HEADS = {"class_path": "lightning_merge.methods.zipit.ZipItMerge", "init_args": {"stop_at": 1.0}}


def merge_config(folder: Path, sources: list, tasks: list[dict], method: dict) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False},
        "model": {
            "class_path": "lightning_merge.module.MergeModule",
            "init_args": {
                "sources": sources,
                "method": method,
                "export_dir": str(folder / "export"),
            },
        },
        "data": {
            "class_path": "lightning_merge.data.MergeDataModule",
            "init_args": {
                "tasks": {
                    "class_path": "lightning_merge.data.DatasetTasks",
                    "init_args": {"tasks": tasks, "calibration_size": 256, "batch_size": 250},
                }
            },
        },
    }
    path = folder / "merge.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def validate(folder: Path, sources: list, tasks: list[dict], method: dict = ZIP_TO_HEADS) -> dict:
    """``lightning-merge validate --config merge.yaml`` in the user's folder; the export's recipe."""
    config = merge_config(folder, sources, tasks, method)
    command = [sys.executable, "-m", "lightning_merge.cli", "validate", "--config", str(config)]
    run(command, cwd=folder, user=folder.parent)
    return yaml.safe_load((folder / "export" / "recipe.yaml").read_text())


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("user")
    (folder / "user_models.py").write_text(textwrap.dedent(USER_CODE))
    return folder


def assert_trained_and_merged(recipe: dict) -> None:
    metrics = recipe["metrics"]
    for i in (0, 1):  # each source on its own task: far above chance (0.2) after a few steps
        assert metrics[f"source{i}/task{i}_acc"] > 0.6, metrics
    assert 0.0 < metrics["merged/joint_acc"] <= 1.0 and "ensemble/joint_acc" in metrics
    assert [s["classes"] for s in recipe["sources"]] == TASKS
    assert [s["head"] for s in recipe["sources"]] == ["linear", "linear"]


def test_checkpoints_of_a_users_lightning_cli_merge_from_yaml(user_folder: Path) -> None:
    (user_folder / "train_cli.py").write_text(CLI_TRAIN)
    paths = []
    for i, classes in enumerate(TASKS):
        root = user_folder / f"cli{i}"
        run(
            [sys.executable, "train_cli.py", "fit", "--model", "user_models.UserNet",
             "--data", "user_models.FashionTaskData", f"--data.classes={classes}",
             "--trainer.max_steps=60", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
             "--trainer.accelerator=cpu", f"--trainer.default_root_dir={root}", f"--seed_everything={i}"],
            cwd=user_folder,
        )  # fmt: skip
        (path,) = root.glob("**/*.ckpt")
        assert torch.load(path, weights_only=True)["hyper_parameters"]["_class_path"] == "user_models.UserNet"
        paths.append(str(path))
    folder = user_folder / "merge_cli"
    folder.mkdir()
    sources = [{"path": p, "attribute": "net"} for p in paths]
    recipe = validate(folder, sources, [task_data(c, f"fashion{i}") for i, c in enumerate(TASKS)])
    assert_trained_and_merged(recipe)
    assert recipe["partial"]["node"] == "_4"  # cut at the input of UserNet.net's last Linear
    template = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 5)
    )  # the user's network, rebuilt from the exported safetensors: one 5-class head per source
    outputs = load_merged(folder / "export", template=template)(torch.randn(3, 1, 28, 28))
    assert [tuple(o.shape) for o in outputs] == [(3, 5), (3, 5)]


def test_checkpoints_of_a_plain_trainer_merge_from_yaml(user_folder: Path) -> None:
    (user_folder / "train_plain.py").write_text(PLAIN_TRAIN)
    run([sys.executable, "train_plain.py", str(user_folder / "plain")], cwd=user_folder)
    folder = user_folder / "merge_plain"
    folder.mkdir()
    sources = [
        {"path": str(user_folder / "plain" / f"plain{i}.ckpt"), "attribute": "net",
         "constructor": "user_models.UserNet", "classes": classes}
        for i, classes in enumerate(TASKS)
    ]  # fmt: skip
    tasks = [task_data(c, f"fashion{i}", as_datamodule=True) for i, c in enumerate(TASKS)]
    assert_trained_and_merged(validate(folder, sources, tasks))


def test_torchvision_models_from_state_dict_files_merge_from_yaml(user_folder: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    folder = user_folder / "merge_torchvision"
    folder.mkdir()
    paths = []
    for i in (0, 1):
        torch.manual_seed(i)
        model = torchvision.models.resnet18(num_classes=10)
        if i == 0:
            paths.append(str(folder / "resnet_a.pt"))
            torch.save(model.state_dict(), paths[-1])
        else:
            paths.append(str(folder / "resnet_b.safetensors"))
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, paths[-1])
    sources = [
        {"path": p, "constructor": "torchvision.models.resnet18", "arguments": {"num_classes": 10},
         "head": "embedding", "classes": classes}
        for p, classes in zip(paths, TASKS, strict=True)
    ]  # fmt: skip
    tasks = [task_data(c, f"fashion{i}", channels=3, test_size=200) for i, c in enumerate(TASKS)]
    method = {"class_path": "lightning_merge.methods.permute.PermuteMerge"}  # one shared 10-class head
    recipe = validate(folder, sources, tasks, method)
    assert [s["classes"] for s in recipe["sources"]] == TASKS
    assert set(recipe["metrics"]) >= {"merged/joint_acc", "merged/task0_acc", "merged/task1_acc"}
    weights = load_file(str(folder / "export" / "model.safetensors"))
    assert weights["fc.weight"].shape == (10, 512) and recipe["partial"] is None  # one merged head
    assert {k for k in weights if k.endswith("conv1.weight")} >= {"conv1.weight", "layer4.1.conv1.weight"}
