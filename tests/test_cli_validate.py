"""``lightning-merge validate``: offline W&B run files, export, 2-process DDP = 1 process, Python API = CLI,
and one working config per registered method."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file
from trained import trained_pair

from lightning_merge.cli import main
from lightning_merge.data import MergeDataModule, TaskSplitDataModule
from lightning_merge.methods import ALL_METHODS
from lightning_merge.methods.zipit import ZipItMerge
from lightning_merge.module import MergeModule

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs" / "merge").glob("*.yaml"))
METRIC_KEYS = {
    f"val/{m}/{k}"
    for m in ("merged", "source0", "source1", "ensemble")
    for k in ("joint_acc", "task0_acc", "task1_acc")
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The cached MLP×0.25 test pair written as Lightning checkpoints (what `lightning-merge fit` saves)."""
    folder = tmp_path_factory.mktemp("sources")
    paths = []
    for i, model in enumerate(trained_pair("mlp", width=0.25)):
        paths.append(str(folder / f"task{i}.ckpt"))
        torch.save(
            {
                "state_dict": model.state_dict(),
                "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": pl.__version__,
            },
            paths[-1],
        )
    return paths


def write_config(path: Path, checkpoints: list[str], save_dir: Path) -> Path:
    """The zipit config of configs/merge with the test pair and a small calibration set."""
    config = yaml.safe_load((REPO / "configs/merge/zipit_fmnist_resnet20x1.yaml").read_text())
    config["trainer"] |= {"accelerator": "cpu", "enable_progress_bar": False}
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(save_dir)
    config["model"]["init_args"] |= {"sources": checkpoints, "stats_path": None}
    config["data"]["init_args"]["tasks"]["init_args"] |= {"calibration_size": 512, "eval_batch_size": 1000}
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_MODE"}  # the CLI must default to offline
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_merge.cli", "validate", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def wandb_records(path: Path) -> Iterator:
    """Records of a ``.wandb`` file: a 7-byte W&B header, then LevelDB-log blocks of protobuf records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def read_run(save_dir: Path) -> tuple[dict, dict, Path]:
    """(config, last summary values, run directory) of the one offline run under ``save_dir``."""
    (run_dir,) = (save_dir / "wandb").glob("offline-run-*")
    config, summary = {}, {}
    for record in wandb_records(next(run_dir.glob("*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            config |= {i.key: json.loads(i.value_json) for i in record.config.update}
        elif kind == "summary":
            summary |= {
                i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update
            }
    return config, summary, run_dir


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, checkpoints: list[str]) -> Path:
    """One CLI run on one process with W&B and export; returns its folder."""
    root = tmp_path_factory.mktemp("single")
    config = write_config(root / "config.yaml", checkpoints, root / "wandb")
    proc = run_cli("--config", str(config), "--model.init_args.export_dir", str(root / "export"), cwd=REPO)
    (root / "stdout.txt").write_text(proc.stdout)
    return root


def test_cli_writes_offline_wandb_run_with_metrics_table_and_images(single: Path) -> None:
    config, summary, run_dir = read_run(single / "wandb")
    assert set(summary) >= METRIC_KEYS
    recipe = yaml.safe_load((single / "export" / "recipe.yaml").read_text())
    assert {k: summary[f"val/{k}"] for k in recipe["metrics"]} == recipe["metrics"]
    assert config["method"]["class_path"] == "lightning_merge.methods.zipit.ZipItMerge"
    assert config["sources"] == [s["path"] for s in recipe["sources"]]
    assert config["tasks"]["init_args"]["calibration_size"] == 512  # the task data's own arguments
    media = run_dir / "files" / "media"
    (table,) = (media / "table" / "merge").glob("results_*.table.json")
    rows = {r[0]: r[1:] for r in json.loads(table.read_text())["data"]}
    assert rows["merged"][0] == pytest.approx(recipe["metrics"]["merged/joint_acc"])
    assert len(list((media / "images" / "merge").glob("accuracy_*.png"))) == 1
    assert len(list((media / "images" / "merge").glob("correlation_*.png"))) == 3
    stdout = (single / "stdout.txt").read_text()
    assert "merge results" in stdout and "ensemble" in stdout  # the rich results table


def test_ddp_two_processes_give_identical_weights_and_metrics(
    single: Path, tmp_path: Path, checkpoints: list[str]
) -> None:
    config = write_config(tmp_path / "config.yaml", checkpoints, tmp_path / "wandb")
    run_cli(
        "--config",
        str(config),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.logger",
        "false",
        "--model.init_args.export_dir",
        str(tmp_path / "export"),
        cwd=REPO,
    )
    one, two = (
        load_file(str(single / "export/model.safetensors")),
        load_file(str(tmp_path / "export/model.safetensors")),
    )
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    metrics = [yaml.safe_load((d / "export/recipe.yaml").read_text())["metrics"] for d in (single, tmp_path)]
    assert metrics[0] == metrics[1]


def test_python_api_agrees_with_the_cli(single: Path, checkpoints: list[str]) -> None:
    pl.seed_everything(0)
    module = MergeModule(sources=checkpoints, method=ZipItMerge(alpha=0.3, beta=0.125))
    dm = TaskSplitDataModule(calibration_size=512, eval_batch_size=1000)
    pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False).validate(
        module, datamodule=MergeDataModule(dm), verbose=False
    )
    recipe = yaml.safe_load((single / "export/recipe.yaml").read_text())
    assert module.results == recipe["metrics"]
    cli_weights = load_file(str(single / "export/model.safetensors"))
    assert all(torch.equal(cli_weights[k], v) for k, v in module.merged.state_dict().items())


def test_every_method_has_a_config() -> None:
    names = {yaml.safe_load(p.read_text())["model"]["init_args"]["method"]["class_path"] for p in CONFIGS}
    assert {f"{cls.__module__}.{cls.__qualname__}" for cls in ALL_METHODS} <= names


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_instantiates_with_command_line_overrides(
    config: Path, checkpoints: list[str], tmp_path: Path
) -> None:
    parsed = yaml.safe_load(config.read_text())
    parsed.pop("verbose")  # an option of the validate subcommand, absent when the CLI does not run
    (tmp_path / config.name).write_text(yaml.safe_dump(parsed))
    args = [
        "--config",
        str(tmp_path / config.name),
        "--trainer.logger",
        "false",
        f"--model.init_args.sources=[{checkpoints[0]}, {checkpoints[1]}]",
    ]
    if parsed["model"]["init_args"]["base"] is not None:
        args.append(f"--model.init_args.base={checkpoints[0]}")
    cli = main(args, run=False)
    module = cli.model
    assert isinstance(module, MergeModule) and module.source_specs == checkpoints
    assert module.repair == parsed["model"]["init_args"]["repair"]
    assert_built_as_configured(module.method, parsed["model"]["init_args"]["method"])


def assert_built_as_configured(method: object, expected: dict) -> None:
    """The object has the YAML's class and every argument the YAML sets (nested methods likewise)."""
    assert f"{type(method).__module__}.{type(method).__qualname__}" == expected["class_path"]
    for key, value in (expected.get("init_args") or {}).items():
        if isinstance(value, dict) and "class_path" in value:
            assert_built_as_configured(getattr(method, key), value)
        else:
            assert getattr(method, key) == value, key


def test_repair_rescale_on_two_processes_equals_one(tmp_path: Path, checkpoints: list[str]) -> None:
    """REPAIR's sums are all-reduced: 2 DDP processes (each on half the calibration batches) give the
    1-process merge, to float32 rounding of the folded weights."""
    config = write_config(tmp_path / "config.yaml", checkpoints, tmp_path / "wandb")
    run_cli(
        "--config",
        str(config),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.logger",
        "false",
        "--model.init_args.repair",
        "rescale",
        "--data.init_args.tasks.init_args.eval_batch_size",
        "256",  # 2 calibration batches, one per rank
        "--model.init_args.export_dir",
        str(tmp_path / "export"),
        cwd=REPO,
    )
    pl.seed_everything(0)
    module = MergeModule(sources=checkpoints, method=ZipItMerge(alpha=0.3, beta=0.125), repair="rescale")
    dm = TaskSplitDataModule(calibration_size=512, eval_batch_size=256)
    pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False).validate(
        module, datamodule=MergeDataModule(dm), verbose=False
    )
    two = load_file(str(tmp_path / "export/model.safetensors"))
    for key, value in module.merged.state_dict().items():
        torch.testing.assert_close(two[key], value, rtol=1e-5, atol=1e-6)
    recipe = yaml.safe_load((tmp_path / "export/recipe.yaml").read_text())
    assert recipe["repair"] == "rescale"
    assert recipe["metrics"]["merged/joint_acc"] == pytest.approx(
        module.results["merged/joint_acc"], abs=2e-4
    )
