"""benchmarks/zoo_coverage.py without running a model: size skips become rows, the summary counts
each method's exact merges (float32 apart from float64-only), and a finished row is not redone."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("torchvision")
BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("zoo_coverage_cli", BENCH / "zoo_coverage.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo_coverage_cli"] = module
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    return module


def test_a_model_over_the_size_limit_is_a_row_that_says_so(zoo: ModuleType, tmp_path: Path) -> None:
    zoo.main(["--only", "vgg11", "--max-params", "100"], log=lambda _: None)
    row = json.loads((tmp_path / "zoo_coverage.json").read_text())["rows"]["vgg11"]
    assert row["status"] == "skipped (size)"
    assert row["params_M"] == 132.9
    assert row["error"] == "132.9 M params > --max-params 100"
    md = (tmp_path / "zoo_coverage.md").read_text()
    assert "| vgg11 | 132.9 |  | skipped (size): 132.9 M params > --max-params 100 |" in md
    assert "skipped (size) 1" in md and "not run" in md


def test_finished_rows_are_kept_unless_rerun(zoo: ModuleType, tmp_path: Path) -> None:
    done = {"arch": "alexnet", "status": "ok", "methods": dict.fromkeys(zoo.METHODS, "ok"), "total_s": 1}
    (tmp_path / "zoo_coverage.json").write_text(json.dumps({"rows": {"alexnet": done}}))
    zoo.main(["--only", "alexnet", "--max-params", "1"], log=lambda _: None)
    assert json.loads((tmp_path / "zoo_coverage.json").read_text())["rows"]["alexnet"] == done
    zoo.main(["--only", "alexnet", "--max-params", "1", "--rerun"], log=lambda _: None)
    assert json.loads((tmp_path / "zoo_coverage.json").read_text())["rows"]["alexnet"]["status"] == (
        "skipped (size)"
    )


def test_summary_counts_float32_and_float64_merges_apart(zoo: ModuleType) -> None:
    methods = list(zoo.METHODS)
    a = dict.fromkeys(methods, "ok")
    b = {**a, methods[-1]: "ok in float64 (float32 2.8e-05)"}
    c = {**a, methods[0]: "error 4.3e-04 (float64: error 4.3e-04)"}
    assert [zoo.row_status(r) for r in (a, b, c)] == ["ok", "ok (float64)", "failed"]
    rows = {k: {"status": zoo.row_status(r), "methods": r} for k, r in zip("xyz", (a, b, c), strict=True)}
    lines = zoo.summary(rows, ["x", "y", "z", "w"])
    assert lines[0] == "Architectures: 4; failed 1, not run 1, ok 1, ok (float64) 1"
    assert f"{methods[0]} 2/4" in lines[2] and f"{methods[-1]} 2/4" in lines[2]
    assert f"{methods[0]} 2/4" in lines[4] and f"{methods[-1]} 3/4" in lines[4]


def test_a_large_model_runs_one_worker_per_method_and_a_killed_worker_costs_one_cell(
    zoo: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []

    def fake(arch: str, methods: list[str], images: int, timeout: float) -> dict:
        calls.append(methods)
        if methods == ["pleas"]:
            return {"arch": arch, "status": "crashed", "error": "worker died: exit code -9", "total_s": 5.0}
        return {"arch": arch, "params_M": 50.0, "status": "ok", "methods": {methods[0]: "ok"}, "total_s": 2.0}

    monkeypatch.setattr(zoo, "run_isolated", fake)
    monkeypatch.setattr(zoo, "params_millions", lambda arch: 50.0)
    zoo.main(["--only", "alexnet", "--split-above", "40"], log=lambda _: None)
    assert calls == [[m] for m in zoo.METHODS]
    row = zoo.load_rows()["alexnet"]
    assert row["methods"]["pleas"] == "crashed: worker died: exit code -9"
    assert all(row["methods"][m] == "ok" for m in zoo.METHODS if m != "pleas")
    assert row["status"] == "crashed" and row["total_s"] == 2.0 * (len(zoo.METHODS) - 1) + 5.0
    assert row["params_M"] == 50.0


def test_drivers_side_by_side_keep_each_others_rows(zoo: ModuleType) -> None:
    zoo.save_row("a", {"arch": "a", "status": "ok", "total_s": 1})
    zoo.save_row("b", {"arch": "b", "status": "ok", "total_s": 1})
    assert set(zoo.load_rows()) == {"a", "b"}


def test_rerunning_some_methods_keeps_the_other_cells(
    zoo: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    methods = list(zoo.METHODS)
    earlier = {
        "arch": "alexnet",
        "status": "failed",
        "methods": {**dict.fromkeys(methods, "ok"), "mudsc": "crashed: worker died: exit code -9"},
        "permute_s": 3.0,
        "total_s": 20.0,
    }
    zoo.save_row("alexnet", earlier)

    def fake(arch: str, run: list[str], images: int, timeout: float) -> dict:
        assert run == ["mudsc"]
        return {"arch": arch, "status": "ok", "methods": {"mudsc": "ok"}, "mudsc_s": 4.0, "total_s": 4.0}

    monkeypatch.setattr(zoo, "run_isolated", fake)
    monkeypatch.setattr(zoo, "params_millions", lambda arch: 10.0)
    zoo.main(["--only", "alexnet", "--rerun", "--methods", "mudsc"], log=lambda _: None)
    row = zoo.load_rows()["alexnet"]
    assert row["methods"] == dict.fromkeys(methods, "ok") and list(row["methods"]) == methods
    assert row["status"] == "ok" and row["total_s"] == 7.0  # 4 s now + the kept cells' 3 s


def test_a_crashed_rerun_of_some_methods_marks_only_their_cells(zoo: ModuleType) -> None:
    methods = list(zoo.METHODS)
    earlier = {"arch": "a", "status": "ok", "methods": dict.fromkeys(methods, "ok"), "total_s": 9.0}
    crashed = {"arch": "a", "status": "crashed", "error": "worker died: exit code -9", "total_s": 2.0}
    row = zoo.with_earlier_cells(crashed, earlier, ["mudsc"])
    assert row["methods"]["mudsc"] == "crashed: worker died: exit code -9"
    assert all(row["methods"][m] == "ok" for m in methods if m != "mudsc")
    assert row["status"] == "failed"
    refused = {"arch": "a", "status": "refused", "error": "GraphError: op x", "total_s": 1.0}
    assert zoo.with_earlier_cells(refused, earlier, ["mudsc"]) == refused


def test_a_crashed_rerun_of_every_method_stays_a_row_level_crash(zoo: ModuleType) -> None:
    methods = list(zoo.METHODS)
    earlier = {"arch": "a", "status": "ok", "methods": dict.fromkeys(methods, "ok"), "total_s": 9.0}
    crashed = {"arch": "a", "status": "crashed", "error": "worker died: exit code -9", "total_s": 2.0}
    assert zoo.with_earlier_cells(crashed, earlier, methods) == crashed
