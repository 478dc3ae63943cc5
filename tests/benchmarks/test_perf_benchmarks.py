"""benchmarks/perf.py, matchers.py and stats_pass.py on tiny sizes: the numbers they measure and the
Markdown / JSON they write (every Markdown number must be its JSON value, rounded)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

from lightning_merge.data import TaskSplitDataModule
from lightning_merge.graph import trace_graph
from lightning_merge.models import MLP

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def perf() -> ModuleType:
    return load("perf")


def check_markdown_matches_json(md_path: Path, json_path: Path) -> dict:
    """Every cell of the Markdown table is its JSON row value (numbers within the printed rounding)."""
    from bench_io import read_markdown_table

    payload = json.loads(json_path.read_text())
    table = read_markdown_table(md_path.read_text())
    assert len(table) == len(payload["rows"]) > 0
    for cells, row in zip(table, payload["rows"], strict=True):
        for col in payload["columns"]:
            text, value = cells[col["header"]], row[col["key"]]
            if value is None:
                assert text == "–", col
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                assert text == str(value), col
            else:
                decimals = re.fullmatch(r"\.(\d+)[fe]", col["format"])
                if col["format"].endswith("e"):
                    assert math.isclose(float(text), value, rel_tol=10 ** -int(decimals.group(1))), col
                else:
                    tol = 0.5 * 10 ** -int(decimals.group(1)) if decimals else 0
                    assert abs(float(text) - value) <= tol + 1e-12, (col, text, value)
    assert payload["command"] in md_path.read_text() and "--out" in payload["command"]
    assert payload["machine"] in md_path.read_text() and "torch" in payload["machine"]
    return payload


# --------------------------------------------------------------------------- memory
def test_memory_accumulators_equal_the_bound_formula(perf: ModuleType, tmp_path: Path) -> None:
    argv = ["--sections", "memory", "--memory-archs", "mlpx0.25", "--memory-models", "2"]
    argv += ["--memory-batch-size", "32", "--memory-batches", "1", "--out", str(tmp_path)]
    (row,) = perf.main(argv)["memory"]
    # independent: the MLP×0.25 graph's observed merge points and their sizes, N = 2
    graph = trace_graph(MLP(width=0.25), torch.zeros(2, 1, 28, 28))
    sizes = {seg.space: graph.space(seg.space).size for tap in graph.taps for seg in tap.segments}
    assert sorted(sizes.values()) == [128, 128, 128]
    dims = [2 * n for n in sizes.values()]
    assert row["bound_bytes"] == sum(8 * d * d for d in dims) == 3 * 8 * 256**2
    assert row["accumulator_bytes"] == sum(8 * (d * d + d + 1) for d in dims)  # Σffᵀ, Σf, count
    # the accumulators live to the end of the pass, so the measured peak holds at least them
    assert row["pass_peak_extra_mib"] * 2**20 >= row["accumulator_bytes"]
    assert row["pass_minus_forward_mib"] == pytest.approx(
        row["pass_peak_extra_mib"] - row["forward_peak_extra_mib"]
    )
    payload = check_markdown_matches_json(tmp_path / "perf_memory.md", tmp_path / "perf_memory.json")
    md = (tmp_path / "perf_memory.md").read_text()
    assert f"| {row['accumulator_bytes']} |" in md and f"| {row['bound_bytes'] / 2**20:.2f} |" in md
    assert payload["rows"][0]["space_sizes"] == {k: 128 for k in sizes}


def test_memory_section_rejects_bad_architectures(perf: ModuleType) -> None:
    with pytest.raises(KeyError, match="resnet99"):
        perf.memory_section(["resnet99x1"], [2])


# --------------------------------------------------------------------------- e2e
def test_e2e_stage_times_on_mlp_sources(perf: ModuleType, source_pair: Callable, tmp_path: Path) -> None:
    pair = source_pair("mlp", width=0.25)
    dm = TaskSplitDataModule(calibration_size=256, eval_batch_size=1000)
    rows = perf.e2e_section(pair, methods=["zipit", "pleas"], datamodule=dm)
    assert [r["method"] for r in rows] == ["zipit", "pleas w=1.5"]
    print("\nMLP×0.25 e2e joint %: " + ", ".join(f"{r['method']} {r['joint_acc']:.2f}" for r in rows))
    for r in rows:
        timed = {k: r[f"{k}_s"] for k in perf.STAGES if r[f"{k}_s"] is not None}
        assert all(t > 0 for t in timed.values()), timed
        assert r["stages_sum_s"] == pytest.approx(sum(timed.values()))
        assert r["stages_sum_s"] <= r["total_s"]
        # the staged merge is the MergeModule's merge: same accuracy on the 10k test images
        assert r["module_joint_acc"] == pytest.approx(r["joint_acc"], abs=1e-6)
        assert 20 < r["joint_acc"] <= 100 and r["module_s"] > 0
    assert rows[0]["refit_s"] is None and rows[1]["refit_s"] > 0  # only PLeaS refits
    args = perf.parse_args(["--out", str(tmp_path)])
    perf.write_section("e2e", rows, args, ["--sections", "e2e", "--out", str(tmp_path)], "test machine torch")
    check_markdown_matches_json(tmp_path / "perf_e2e.md", tmp_path / "perf_e2e.json")


def test_e2e_rejects_unknown_methods_and_plain_modules(perf: ModuleType, source_pair: Callable) -> None:
    with pytest.raises(KeyError, match="ties"):
        perf.e2e_section(source_pair("mlp", width=0.25), methods=["ties"])
    with pytest.raises(TypeError, match=r"sources\[0\]"):
        perf.heads_of([MLP(width=0.25), MLP(width=0.25)])


# --------------------------------------------------------------------------- ddp
def test_compare_states_tells_buffers_from_parameters(perf: ModuleType) -> None:
    a = {"w": torch.ones(3), "bn.running_mean": torch.zeros(2)}
    b = {"w": torch.ones(3), "bn.running_mean": torch.tensor([0.0, 1e-7])}
    got = perf.compare_states(a, b)
    assert got["params_identical"] and not got["bitwise_identical"]
    assert got["max_abs_diff"] == pytest.approx(1e-7) and got["differing"] == ["bn.running_mean"]
    assert perf.compare_states(a, a)["bitwise_identical"]
    with pytest.raises(KeyError, match="extra"):
        perf.compare_states(a, {**a, "extra": torch.ones(1)})


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LM_PERF_DDP"), reason="~60 s on 2 cores; set LM_PERF_DDP=1")
def test_ddp_section_one_vs_two_processes(perf: ModuleType, source_pair: Callable) -> None:
    rows = perf.ddp_section(source_pair("mlp", width=0.25), calibration_size=256)
    assert [r["processes"] for r in rows] == [1, 2]
    assert rows[1]["params_identical"] and rows[1]["joint_acc"] == pytest.approx(rows[0]["joint_acc"])
    assert all(r["validate_s"] > 0 and r["process_s"] > r["validate_s"] for r in rows)


# --------------------------------------------------------------------------- matchers / stats pass
def test_matchers_and_stats_pass_write_matching_json(tmp_path: Path) -> None:
    matchers = load("matchers")
    rows = matchers.main(
        ["--sizes", "16", "32", "--ref-max-n", "16", "--repeats", "1", "--out", str(tmp_path)]
    )
    payload = check_markdown_matches_json(tmp_path / "matchers.md", tmp_path / "matchers.json")
    assert payload["rows"] == json.loads(json.dumps(rows))
    small, big = payload["rows"]
    assert small["same_fusions"] is True and small["speedup"] == pytest.approx(
        small["reference_s"] / small["fast_s"]
    )
    assert big["reference_s"] is None and big["dim"] == 64

    stats_pass = load("stats_pass")
    argv = [
        "--archs",
        "resnet20x1",
        "--runs",
        "1",
        "--batches",
        "1",
        "--batch-size",
        "4",
        "--out",
        str(tmp_path),
    ]
    (row,) = stats_pass.main(argv)
    payload = check_markdown_matches_json(tmp_path / "stats_pass.md", tmp_path / "stats_pass.json")
    assert payload["rows"][0]["ratio_f64_wall"] == pytest.approx(
        row["pass_f64_wall_s"] / row["forward_wall_s"]
    )
    assert row["taps"] == 19 and row["state_mib"] > 0 and row["input"] == "1×28×28"
    assert row["flop_ratio"] > 1  # the moments' float64 products come on top of the forward
    with pytest.raises(SystemExit):
        stats_pass.main(["--archs", "resnet99"])
    # a torchvision name: the coverage table's input, its own output stem
    argv = ["--archs", "squeezenet1_1", "--runs", "1", "--batches", "1", "--batch-size", "2"]
    (row,) = stats_pass.main([*argv, "--name", "stats_pass_tv", "--out", str(tmp_path)])
    assert row["input"] == "3×64×64" and row["taps"] > 0
    check_markdown_matches_json(tmp_path / "stats_pass_tv.md", tmp_path / "stats_pass_tv.json")


def test_patch_gram_benchmark_agrees_with_the_unfolded_product(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    patch_gram = load("patch_gram")
    monkeypatch.setattr(patch_gram, "SHAPES", [("tiny", 4, 6), ("tinier", 3, 5)])
    patch_gram.main(["--batch", "64", "--runs", "1", "--out", str(tmp_path)])
    payload = check_markdown_matches_json(tmp_path / "patch_gram.md", tmp_path / "patch_gram.json")
    assert [r["shape"] for r in payload["rows"]] == ["64×4×6×6", "64×3×5×5"]
    for row in payload["rows"]:
        assert row["err_shift"] < 1e-12 and row["err_sym"] < 1e-12
        assert row["speedup"] == pytest.approx(row["unfold_s"] / row["shift_s"])


def test_patch_gram_strided_section_agrees_with_the_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both paths of a strided conv's joint Gram give the same sums; the default path is the one
    ``shifted_sums_apply`` picks (phases for a 3×3 stride-2 conv with enough work, rows below it)."""
    patch_gram = load("patch_gram")
    specs = [("3x3 s2", 3, 2, 1, 16, 16, 24), ("7x7 s2 tiny", 7, 2, 3, 2, 2, 8)]
    monkeypatch.setattr(patch_gram, "STRIDED", specs)
    patch_gram.main(["--sections", "strided", "--runs", "1", "--out", str(tmp_path)])
    payload = check_markdown_matches_json(
        tmp_path / "patch_gram_strided.md", tmp_path / "patch_gram_strided.json"
    )
    assert [r["default"] for r in payload["rows"]] == ["phases", "rows"]  # 16·12² rows × 32² ≥ 2²¹
    for row in payload["rows"]:
        assert row["err"] < 1e-12
        assert row["speedup"] == pytest.approx(row["rows_s"] / row["phases_s"])


def test_repair_summary_counts_gains_per_seed_group() -> None:
    repair = load("repair")
    raw = [{"method": "ensemble", "repair": "reference", "joint_acc": v} for v in (60.0, 62.0)]
    for method in repair.ROWS:
        raw += [
            {"method": method, "repair": "none", "joint_acc": 50.0},
            {"method": method, "repair": "none", "joint_acc": 52.0},
            {"method": method, "repair": "rescale", "joint_acc": 55.0},
            {"method": method, "repair": "rescale", "joint_acc": 51.0},
        ]
    lines = repair.summarise(raw)
    assert lines[0] == {"method": "ensemble", "none": "61.00 ± 1.41", "rescale": "", "gain": None}
    for line in lines[1:]:
        assert line["gain"] == pytest.approx(2.0) and line["wins"] == "1/2"
        assert line["none"] == "51.00 ± 1.41" and line["rescale"] == "53.00 ± 2.83"
    assert [line["method"] for line in lines[1:]] == repair.ROWS


def test_whole_merge_flops_count_products_and_the_moments_accumulation() -> None:
    """The FLOPs column counts matrix products, float64 in-place ``addmm_`` included (torch's counter
    has no formula for it): 2·m·k·n each."""
    whole_merge = load("whole_merge")
    a, b = torch.randn(4, 5, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    acc = torch.zeros(4, 6, dtype=torch.float64)
    assert whole_merge.flops(lambda: a @ b) == 2 * 4 * 5 * 6
    assert whole_merge.flops(lambda: (acc.addmm_(a, b), a @ b)) == 2 * (2 * 4 * 5 * 6)


@pytest.mark.parametrize("reset_sources", [True, False])
def test_whole_merge_references_reuse_the_sources_reset(
    reset_sources: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'+ references' adds the treated references MergeModule scores: a method that reset its sources
    hands those over (no second reset); any other method resets copies of the untreated sources."""
    whole_merge = load("whole_merge")
    calls: list[tuple[str, object]] = []
    untreated = SimpleNamespace(models=["a", "b"], graph="g")
    treated = SimpleNamespace(models=["a'", "b'"], graph="g")
    monkeypatch.setattr(
        whole_merge, "reset_source_batchnorm", lambda s, c: calls.append(("reset", s)) or treated
    )
    monkeypatch.setattr(whole_merge, "collect_statistics", lambda *a, **k: calls.append(("stats", a[0])))
    monkeypatch.setattr(whole_merge, "run_method", lambda m, s, st, c: calls.append(("merge", s)) or "result")
    monkeypatch.setattr(whole_merge, "post_merge", lambda r, s, c, repair: calls.append(("post", s)))
    monkeypatch.setattr(whole_merge, "treat_references", lambda m, c, repair: calls.append(("refs", m)))
    method = SimpleNamespace(reset_sources=reset_sources, requires=frozenset({"moments"}))
    whole_merge.whole_merge(method, untreated, [], references=True)
    used = treated if reset_sources else untreated
    expected = [("stats", used.models), ("merge", used), ("post", used)]
    if reset_sources:
        assert calls == [("reset", untreated), *expected]
    else:
        assert calls == [*expected, ("refs", untreated.models)]
