"""Export of a merge: safetensors + recipe, reloaded as a plain module that reproduces the metrics."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from trained import quiet_trainer, trained_pair

from lightning_merge.apply.partial import PartialZipModel
from lightning_merge.data import MergeDataModule, TaskSplitDataModule
from lightning_merge.evaluation import evaluate_model
from lightning_merge.methods.zipit import ZipItMerge
from lightning_merge.models import MLP
from lightning_merge.module import MergeModule
from lightning_merge.pipeline.export import load_merged, read_recipe
from lightning_merge.stats.store import model_fingerprint


def run(sources: list, method: ZipItMerge, export_dir: Path) -> tuple[MergeModule, TaskSplitDataModule]:
    dm = TaskSplitDataModule(calibration_size=512, eval_batch_size=1000)
    module = MergeModule(sources=sources, method=method, export_dir=str(export_dir), evaluate_sources=False)
    quiet_trainer().validate(module, datamodule=MergeDataModule(dm), verbose=False)
    return module, dm


def merged_metrics(results: dict[str, float]) -> dict[str, float]:
    return {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith("merged/")}


def reload_and_score(directory: Path, module: MergeModule, dm: TaskSplitDataModule, **kw: object) -> dict:
    model = load_merged(directory, **kw)
    loaders = [dm.task_test_dataloader(t) for t in range(len(dm.tasks))]
    return model, evaluate_model(model, loaders, dm.tasks, module.prepared.heads)


@pytest.fixture(scope="module")
def pair() -> list:
    return trained_pair("mlp", width=0.25)


def test_widened_merge_reloads_resized_and_reproduces_the_logged_accuracies(
    tmp_path: Path, pair: list
) -> None:
    module, dm = run(pair, ZipItMerge(width=1.5), tmp_path)
    recipe = read_recipe(tmp_path)
    assert recipe["metrics"] == pytest.approx(module.results)
    assert [s["fingerprint"] for s in recipe["sources"]] == [model_fingerprint(p.model) for p in pair]
    assert recipe["graph_digest"] == module.prepared.graph.digest()
    assert recipe["statistics_digest"] and recipe["partial"] is None
    assert recipe["method"]["class_path"] == "lightning_merge.methods.zipit.ZipItMerge"
    assert recipe["method"]["init_args"]["width"] == 1.5
    model, scores = reload_and_score(tmp_path, module, dm)
    width = module.merged.layers[0].out_features
    assert width > pair[0].model.layers[0].out_features  # a widened merge ...
    assert isinstance(model, MLP) and model.layers[0].out_features == width  # ... resized on load
    assert scores == merged_metrics(module.results)
    for key, value in module.merged.state_dict().items():
        assert torch.equal(model.state_dict()[key], value.cpu()), key


def test_partial_zip_reloads_with_one_head_per_source(tmp_path: Path, pair: list) -> None:
    module, dm = run(pair, ZipItMerge(stop_at=0.5), tmp_path)
    recipe = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    cut = module.prepared.graph.cut_points
    assert recipe["partial"]["node"] in [c.node for c in cut] and recipe["partial"]["channel_dim"] in (1, -1)
    model, scores = reload_and_score(tmp_path, module, dm)
    assert isinstance(model, PartialZipModel) and len(model.tails) == 2
    x = next(iter(dm.calibration_dataloader()))[0][:16]
    for got, want in zip(model(x), module.merged(x), strict=True):
        assert torch.equal(got, want)
    assert scores == merged_metrics(module.results)


def test_plain_module_export_needs_a_template(tmp_path: Path, pair: list) -> None:
    sources = [copy.deepcopy(p.model) for p in pair]
    module, dm = run(sources, ZipItMerge(), tmp_path)
    with pytest.raises(ValueError, match="pass template="):
        load_merged(tmp_path)
    _, scores = reload_and_score(tmp_path, module, dm, template=copy.deepcopy(pair[0].model))
    assert scores == merged_metrics(module.results)


def test_tampered_or_missing_exports_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="recipe.yaml not found"):
        load_merged(tmp_path)
    (tmp_path / "recipe.yaml").write_text(
        yaml.safe_dump({"format": "lightning_merge.merged", "weights_sha256": "0"})
    )
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="does not match the checksum"):
        load_merged(tmp_path)
    (tmp_path / "recipe.yaml").write_text("format: something_else\n")
    with pytest.raises(ValueError, match="is not a lightning_merge merge recipe"):
        load_merged(tmp_path)
