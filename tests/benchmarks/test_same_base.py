"""benchmarks/same_base.py: the aggregation over seed groups, and a tiny run whose table is its JSON."""

from __future__ import annotations

import importlib
import json
import statistics
from pathlib import Path
from types import ModuleType

import pytest
from benchmark_scripts import benchmark_script


@pytest.fixture(scope="module")
def sb() -> ModuleType:
    return benchmark_script("same_base")


def _row(method: str, joint: float, seeds: str = "0:1:2", task0: float | None = 50.0) -> dict:
    return {"seeds": seeds, "method": method, "joint_acc": joint, "task0_acc": task0, "task1_acc": 70.0,
            "avg_acc": 60.0, "rel_flops": 1.0}  # fmt: skip


def test_aggregate_gives_mean_and_sample_std_in_table_order(sb: ModuleType) -> None:
    rows = [
        _row("Fisher", 70.0),
        _row("base", 60.0),
        _row("Fisher", 74.0, "3:4:5"),
        _row("base", 61.0, "3:4:5"),
    ]
    rows.append(_row("custom", 1.0, task0=None))
    got = sb.aggregate(rows)
    assert [r["method"] for r in got] == ["base", "Fisher", "custom"]  # references, merges, then the rest
    fisher = got[1]
    assert fisher["groups"] == 2
    assert fisher["joint_acc_mean"] == 72.0 and fisher["joint_acc_std"] == pytest.approx(2 * 2**0.5)
    assert fisher["joint_acc"] == "72.00 ± 2.83" and fisher["task0_acc"] == "50.00 ± 0.00"
    assert fisher["rel_flops"] == "1.00"  # a cost is shown without a spread
    assert got[2]["joint_acc"] == "1.00" and got[2]["joint_acc_std"] is None  # one group: no std
    assert got[2]["task0_acc"] is None and got[2]["task0_acc_mean"] is None  # a missing number stays missing


def test_a_seed_group_names_three_models(sb: ModuleType, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        sb.main(["--seeds", "0:1"])
    assert "a seed group is BASE:TUNE0:TUNE1, got ['0:1']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sb.main(["--calibration-size", "0"])
    assert "--calibration-size must be at least 1" in capsys.readouterr().err


def test_tiny_run_writes_every_row_and_every_number_from_its_json(sb: ModuleType, tmp_path: Path) -> None:
    """Two seed groups of models trained for 2 batches (the numbers are not the point)."""
    argv = ["--seeds", "7:8:9", "10:11:12", "--base-batches", "2", "--tune-batches", "2"]
    argv += ["--calibration-size", "64", "--cache-dir", str(tmp_path / "cache"), "--out-dir", str(tmp_path)]
    sb.main(argv)
    data = json.loads((tmp_path / "same_base_mlp.json").read_text())
    labels = [*sb.REFERENCES, *(label for label, _ in sb.merge_rows())]
    assert [r["method"] for r in data["rows"]] == labels and len(labels) == 12
    assert [r["method"] for r in data["groups"]] == labels * 2
    for agg in data["rows"]:
        mine = [r for r in data["groups"] if r["method"] == agg["method"]]
        assert [r["seeds"] for r in mine] == ["7:8:9", "10:11:12"]
        for key in sb.ACCURACIES:
            values = [r[key] for r in mine]
            assert all(0 <= v <= 100 for v in values)
            assert agg[f"{key}_mean"] == pytest.approx(statistics.fmean(values))
            assert agg[f"{key}_std"] == pytest.approx(statistics.stdev(values))
    by = {r["method"]: r for r in data["groups"] if r["seeds"] == "7:8:9"}
    assert by["ensemble of the fine-tuned"]["rel_flops"] == pytest.approx(2.0)
    assert by["ensemble of the fine-tuned"]["task0_acc"] == by["fine-tuned on 0–4"]["task0_acc"]
    assert {by[label]["rel_flops"] for label, _ in sb.merge_rows()} == {1.0}
    assert by["MaTS kfac"]["config"]["init_args"]["subspace"] == "kfac"
    sources = data["sources"]
    assert [(s["seed"], s["batches"], s["epochs"]) for s in sources[:3]] == [(7, 2, 1), (8, 2, 1), (9, 2, 1)]
    assert sources[0]["joint_acc"] == by["base"]["joint_acc"]
    assert data["settings"]["calibration_size"] == 64
    md = (tmp_path / "same_base_mlp.md").read_text()
    table = importlib.import_module("bench_io").read_markdown_table(md)
    headers = {c["key"]: c["header"] for c in data["columns"]}
    assert [r["method"] for r in table] == labels
    for shown, agg in zip(table, data["rows"], strict=True):
        for key in (*sb.ACCURACIES, "rel_flops"):
            assert shown[headers[key]] == agg[key]
            spread = "" if key == "rel_flops" else f" ± {agg[f'{key}_std']:.2f}"
            assert agg[key] == f"{agg[f'{key}_mean']:.2f}{spread}"
    assert "benchmarks/same_base.py --seeds 7:8:9 10:11:12 --base-batches 2" in md


def test_converged_families_train_to_a_plateau_without_batch_caps(sb: ModuleType) -> None:
    """``--converged``: no batch cap, the plateau rule and the step-down schedule in every member's
    training (so in its cache key), its own output stem, and each member's curve in the notes."""
    from lightning_merge.models import PlateauRule

    settings = sb.Settings(converged=True)
    member = sb.Member("base", 0, list(range(10)), settings.base_batches, None)
    got = sb._arguments(member, settings)
    assert got["limit_train_batches"] is None and got["max_epochs"] == 30
    assert got["plateau"] == PlateauRule() and got["schedule"] == "plateau"
    short = sb._arguments(member, sb.Settings())
    assert short["limit_train_batches"] == 40 and "plateau" not in short
    assert settings.stem == "same_base_mlp_converged" and sb.Settings().stem == "same_base_mlp"
    records = [
        {"seeds": "0:1:2", "epochs": 14, "final_val_acc": 0.85, "plateau_met": True},
        {"seeds": "0:1:2", "epochs": 9, "final_val_acc": 0.9, "plateau_met": False},
    ]
    lines = sb.training_lines(records)
    assert lines[0].startswith("Base and fine-tunes trained until validation accuracy gained < 0.3 points")
    assert lines[1] == "- seeds 0:1:2: 14 ep, val 85.00%, plateau met; 9 ep, val 90.00%, plateau NOT met"
