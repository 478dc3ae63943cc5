"""benchmarks/merge_table.py: its row function on the quick MLP pair, the CSV it writes, the summary."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from lightning_merge.data import TaskSplitDataModule
from lightning_merge.methods import get_method

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_table.py"


@pytest.fixture(scope="module")
def merge_table() -> ModuleType:
    spec = importlib.util.spec_from_file_location("merge_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["merge_table"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def table(merge_table: ModuleType, source_pair: Callable, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    pair = source_pair("mlp", width=0.25)
    dm = TaskSplitDataModule(calibration_size=256, eval_batch_size=1000)
    stats = str(tmp_path_factory.mktemp("stats") / "pair.safetensors")
    rows, first = merge_table.evaluate_merge(
        "average", get_method("average"), pair, dm, stats_path=stats, references=True
    )
    zipped, _ = merge_table.evaluate_merge(
        "zipit partial@0.5", get_method("zipit", stop_at=0.5), pair, dm, stats_path=stats
    )
    again, _ = merge_table.evaluate_merge("zipit", get_method("zipit"), pair, dm, stats_path=stats)
    return rows + zipped + again, first


def test_rows_hold_the_module_results_and_valid_numbers(table: tuple) -> None:
    rows, module = table
    assert [r["method"] for r in rows] == [
        "model A",
        "model B",
        "ensemble",
        "average",
        "zipit partial@0.5",
        "zipit",
    ]
    by = {r["method"]: r for r in rows}
    res = module.results
    for label, key in [("ensemble", "ensemble"), ("model A", "source0"), ("average", "merged")]:
        assert by[label]["joint_acc"] == pytest.approx(100 * res[f"{key}/joint_acc"])
        assert by[label]["task_a_acc"] == pytest.approx(100 * res[f"{key}/task0_acc"])
        assert by[label]["task_b_acc"] == pytest.approx(100 * res[f"{key}/task1_acc"])
    for r in rows:
        for c in ("joint_acc", "task_a_acc", "task_b_acc", "avg_task_acc"):
            assert 0 <= r[c] <= 100, (r["method"], c)
        assert r["avg_task_acc"] == pytest.approx((r["task_a_acc"] + r["task_b_acc"]) / 2)
    assert by["average"]["rel_params"] == 1 and by["average"]["rel_flops"] == pytest.approx(1)
    # a partial zip keeps one tail per source: more parameters and FLOPs than one model, fewer than two
    assert 1 < by["zipit partial@0.5"]["rel_params"] < 2 and 1 < by["zipit partial@0.5"]["rel_flops"] < 2
    assert by["ensemble"]["joint_acc"] > by["average"]["joint_acc"]
    # the statistics pass runs once for the pair; the next row loads the file
    assert [by[m]["stats"] for m in ("average", "zipit partial@0.5", "zipit")] == ["none", "pass", "cache"]


def test_csv_and_summary(merge_table: ModuleType, table: tuple, tmp_path: Path) -> None:
    rows, _ = table
    path = tmp_path / "t.csv"
    merge_table.write_csv(rows, path)
    with path.open() as f:
        read = list(csv.DictReader(f))
    assert tuple(read[0]) == merge_table.COLUMNS and len(read) == len(rows)
    assert float(read[2]["joint_acc"]) == pytest.approx(rows[2]["joint_acc"], abs=1e-4)
    md = merge_table.summary_markdown(rows + [{**r, "pair": "2:3"} for r in rows], "cmd", "box", "T")
    line = next(x for x in md.splitlines() if x.startswith("| ensemble |"))
    assert f"{rows[2]['joint_acc']:.2f} ± 0.00" in line  # two equal pairs: zero spread
    assert "of the ensemble's" in md and "cmd" in md and "Machine: box" in md


def test_pair_argument(merge_table: ModuleType) -> None:
    assert merge_table.parse_pair("2:3") == (2, 3)
    with pytest.raises(argparse.ArgumentTypeError, match="SEED_A:SEED_B.*'2-3'"):
        merge_table.parse_pair("2-3")


def test_rows_include_pleas_only_on_request(merge_table: ModuleType) -> None:
    plain = [label for label, _ in merge_table.method_rows()]
    assert not any(label.startswith("pleas") for label in plain)
    assert plain[:4] == ["average", "weight_matching", "permute", "zipit"]
    with_pleas = [label for label, _ in merge_table.method_rows(with_pleas=True)]
    assert [x for x in with_pleas if x.startswith("pleas")] == ["pleas w=1", "pleas w=1.5", "pleas w=2"]
