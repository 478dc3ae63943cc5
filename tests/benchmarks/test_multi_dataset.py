"""benchmarks/multi_dataset.py (MNIST + Fashion-MNIST, 20 classes): row settings, rows, their reuse."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from benchmark_scripts import benchmark_script

from lightning_merge.methods import AverageMerge, ZipItMerge
from lightning_merge.models import SourceClassifier


@pytest.fixture(scope="module")
def md() -> ModuleType:
    return benchmark_script("multi_dataset")


def test_every_merge_row_keeps_one_head_per_source(md: ModuleType) -> None:
    """Linear heads over digits and clothes cannot share columns: no row may merge the heads."""
    rows = md.method_rows((0.3, 0.6))
    assert [label for label, _ in rows] == [
        "average", "permute", "zipit", "zipit partial@0.3", "zipit partial@0.6", "mudsc", "pleas w=1",
        "pleas w=1.5",
    ]  # fmt: skip
    assert [factory().stop_at for _, factory in rows] == [1.0, 1.0, 1.0, 0.3, 0.6, 1.0, 1.0, 1.0]


def test_rows_hold_both_data_sets_and_are_reused(
    md: ModuleType, mnist_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two small untrained MLPs (the numbers are not the point): the references come with the first merge,
    every accuracy is a percentage, the partial zip costs more than one source, and a rerun reuses rows."""
    nets = [SourceClassifier(arch="mlp", width=0.125, head="linear").model.eval() for _ in range(2)]
    monkeypatch.setattr(md, "sources", lambda *args: nets)
    monkeypatch.setattr(
        md, "method_rows", lambda stops: [("average", lambda: AverageMerge(stop_at=1.0)),
                                          ("zipit partial@0.5", lambda: ZipItMerge(stop_at=0.5))]
    )  # fmt: skip
    argv = ["--seeds", "3:4", "--calibration-size", "200", "--out-dir", str(tmp_path)]
    argv += ["--stats-dir", str(tmp_path / "stats")]
    rows = md.main(argv)
    labels = ["MNIST model", "Fashion-MNIST model", "ensemble", "ensemble (reset)", "average"]
    assert [r["method"] for r in rows] == [*labels, "zipit partial@0.5"]
    by = {r["method"]: r for r in rows}
    assert by["MNIST model"]["fmnist_acc"] is None and by["Fashion-MNIST model"]["mnist_acc"] is None
    for r in rows[2:]:
        assert r["seeds"] == "3:4"
        assert all(0 <= r[k] <= 100 for k in ("joint_acc", "mnist_acc", "fmnist_acc"))
        assert r["avg_acc"] == pytest.approx((r["mnist_acc"] + r["fmnist_acc"]) / 2)
    assert by["ensemble"]["mnist_acc"] == by["MNIST model"]["mnist_acc"]  # each head scores its own task
    assert by["ensemble"]["fmnist_acc"] == by["Fashion-MNIST model"]["fmnist_acc"]
    assert by["average"]["rel_params"] == pytest.approx(1.0, abs=0.02)  # the trunk + two 10-logit heads
    assert by["zipit partial@0.5"]["rel_params"] > by["average"]["rel_params"] + 0.05  # two tails
    stored = json.loads((tmp_path / "multi_dataset_mnist_fmnist_mlpx1.json").read_text())
    assert stored["rows"] == json.loads(json.dumps(rows))
    markdown = (tmp_path / "multi_dataset_mnist_fmnist_mlpx1.md").read_text()
    assert "| ensemble (reset) |" in markdown and "benchmarks/multi_dataset.py --seeds 3:4" in markdown
    monkeypatch.setattr(md, "sources", lambda *args: pytest.fail("a rerun must reuse the stored rows"))
    assert md.main(argv) == rows


def test_converged_sources_train_to_a_plateau_and_their_curves_reach_the_table(
    md: ModuleType, mnist_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--converged``: the plateau rule, the step-down schedule and the cap go into the training (and
    so the cache key), the output gets its own stem, and each source's recorded curve is listed."""
    from lightning_merge.models import PlateauRule
    from lightning_merge.models.training import cache_path, source_key

    settings = md.source_settings(1, converged=True)
    assert settings["plateau"] == PlateauRule() and settings["schedule"] == "plateau"
    assert settings["max_epochs"] == 30
    short = md.source_settings(1, converged=False)
    assert short["max_epochs"] == 1 and short["plateau"] is None and short["schedule"] == "onecycle"
    example = {"head": "linear", "lr": 0.05, "weight_decay": 5e-4, "schedule": "onecycle"}
    assert source_key("mlp", range(10), 0, **short) == source_key(
        "mlp", range(10), 0, **example
    )  # cache kept
    cache = tmp_path / "cache"
    for seed, name in ((3, "mnist"), (4, "fashion_mnist")):
        path = cache_path(cache, source_key("mlp", range(10), seed, dataset=name, **settings))
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"epochs": 9 + seed, "final_val_acc": 0.9 + seed / 100, "plateau_met": seed == 3}
        path.with_suffix(".json").write_text(json.dumps(record | {"val_acc_curve": [0.5] * (9 + seed)}))
    nets = [SourceClassifier(arch="mlp", width=0.125, head="linear").model.eval() for _ in range(2)]
    calls = []
    monkeypatch.setattr(md, "sources", lambda *args: calls.append(args) or nets)
    monkeypatch.setattr(md, "method_rows", lambda stops: [("average", lambda: AverageMerge(stop_at=1.0))])
    argv = ["--seeds", "3:4", "--calibration-size", "200", "--out-dir", str(tmp_path), "--converged"]
    md.main([*argv, "--stats-dir", str(tmp_path / "stats"), "--cache-dir", str(cache)])
    assert calls[0][-1] is True  # the converged flag reaches the training
    stored = json.loads((tmp_path / "multi_dataset_mnist_fmnist_mlpx1_converged.json").read_text())
    assert [(s["dataset"], s["epochs"]) for s in stored["sources"]["3:4"]] == [
        ("mnist", 12),
        ("fashion_mnist", 13),
    ]
    text = (tmp_path / "multi_dataset_mnist_fmnist_mlpx1_converged.md").read_text()
    assert "- seeds 3:4: 12 ep, val 93.00%, plateau met; 13 ep, val 94.00%, plateau NOT met" in text
    assert "Sources trained until validation accuracy gained < 0.3 points" in text
    assert "Best merge at ≤ 1.02× a source's FLOPs: **average** (1.01×)" in text  # trunk + two heads
    assert "The first budget is 1.02×, not 1×: every merge keeps both sources' heads." in text
