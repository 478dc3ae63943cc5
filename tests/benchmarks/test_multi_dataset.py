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
        "average", "permute", "zipit", "zipit partial@0.3", "zipit partial@0.6", "mudsc",
    ]  # fmt: skip
    assert [factory().stop_at for _, factory in rows] == [1.0, 1.0, 1.0, 0.3, 0.6, 1.0]


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
