"""benchmarks/sweeps.py and benchmarks/report.py on tiny tables made from the quick MLP pair."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from benchmark_scripts import benchmark_script

from lightning_merge.data import TaskSplitDataModule


def _load(name: str) -> ModuleType:
    return benchmark_script(name)


@pytest.fixture(scope="module")
def results(source_pair: Callable, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A results folder with the first table (two rows), one sweep with its PNGs and a perf note."""
    mt, sweeps = _load("merge_table"), _load("sweeps")
    out = tmp_path_factory.mktemp("results")
    pair = source_pair("mlp", width=0.25)
    dm = TaskSplitDataModule(calibration_size=256, eval_batch_size=1000)
    tasks = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    stats = lambda m: mt.stats_file(out, "s", (0, 1), m, 256)  # noqa: E731
    meta = {"command": "cmd T", "machine": "box", "tasks": tasks}
    table = mt.ResultStore(out / "merge_table_resnet20x1_split2_converged", meta)
    rows = mt.select_rows(mt.method_rows(2), ["average", "permute"])
    mt.run_group((0, 1), rows, dm, lambda: pair, stats, table, lambda: table.save([], "T", 2), print)
    cuts = sweeps.depth_cuts(pair[0], dm.image_shape, [0.3, 0.35])  # both resolve to the first cut
    rows, points = sweeps.sweep_rows(2, [1.5], cuts)
    meta = {"command": "cmd S", "machine": "box", "tasks": tasks, "points": points}
    sweep = mt.ResultStore(out / "sweep_resnet20x1_split2", meta)
    mt.run_group((0, 1), rows, dm, lambda: pair, stats, sweep, lambda: sweep.save([], "S", 2), print)
    for kind in ("width", "depth"):
        name = "pleas_width" if kind == "width" else "zip_depth"
        assert sweeps.plot_sweep(
            sweep.rows, points, kind, 2, kind, out / f"sweep_{name}_resnet20x1_split2.png"
        )
    (out / "perf_merge.md").write_text("# Merge speed\n\n```\n# not a heading\n```\n| a | 1.5 |\n")
    (out / "matchers_zip.md").write_text("# Matchers\n")
    (out / "patch_gram.md").write_text("# Conv Gram\n")
    (out / "repair_mlpx1.md").write_text("# REPAIR\n")
    return out


def test_sweep_rows_and_cut_points(results: Path) -> None:
    data = json.loads((results / "sweep_resnet20x1_split2.json").read_text())
    points = data["points"]
    assert [p for p in points if points[p]["sweep"] == "depth"] == ["zipit partial@layers_1", "zipit"]
    assert points["zipit partial@layers_1"]["x"] == pytest.approx(1 / 3)
    assert {points[p]["series"] for p in points if points[p]["sweep"] == "width"} == {"PLeaS", "ZipIt!"}
    by = {r["method"]: r for r in data["rows"]}
    assert all(r["error"] is None for r in data["rows"])
    assert by["pleas w=1.5"]["rel_params"] > 1 and 1 < by["zipit partial@layers_1"]["rel_flops"] < 2
    for kind in ("pleas_width", "zip_depth"):
        png = results / f"sweep_{kind}_resnet20x1_split2.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_report_carries_the_json_numbers_and_missing_lines(results: Path, tmp_path: Path) -> None:
    report, mt = _load("report"), _load("merge_table")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.README_BEGIN}\n{report.README_END}\n")
    argv = ["--results-dir", str(results), "--out", str(tmp_path / "BENCHMARKS.md"), "--readme", str(readme)]
    text = report.main(argv)
    assert (tmp_path / "BENCHMARKS.md").read_text() == text
    block = report.headline_table(report.headline_entries(results))
    assert block[0].startswith("| table | sources |") and "\n".join(block) in text  # the report's summary
    assert readme.read_text() == "\n".join(["# x", report.README_BEGIN, *block, report.README_END, ""])
    data = json.loads((results / "merge_table_resnet20x1_split2_converged.json").read_text())
    for r in data["rows"]:
        line = next(x for x in text.splitlines() if x.startswith(f"| {r['method']} |"))
        assert f"| {r['joint_acc']:.2f} | {r['task_0_acc']:.2f} | {r['task_1_acc']:.2f} |" in line
    v = mt.verdict(data["rows"], 2)
    headline = mt.headline_lines(data["rows"], 2)
    assert headline[0].startswith("Equally treated ensemble (raw logits): joint")
    for line in headline:  # the headline of merge_table.headline, under the table's heading
        assert f"  - {line}\n" in text
    h = mt.headline(data["rows"], 2)
    assert all(p["method"] in ("average", "permute") for p in h["picks"])
    assert f"{100 * h['picks'][0]['of_treated_ensemble']:.1f}% of the equally treated ensemble's" in text
    # a frontier per table family, drawn by report.main and linked from the report
    png = results / "frontier_resnet20.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "frontier_resnet20.png)" in text
    assert not (results / "frontier_vgg11_bn.png").exists()  # no VGG table: no figure
    assert f"  - beats weight averaging: {mt.beats_average(v)}" in text
    assert "regenerate: `cmd T`" in text and "regenerate: `cmd S`" in text and "Machine: box" in text
    for _, stem, command in report.TABLES[1:]:
        assert f"not run yet: `{command}`" in text, stem
    assert "](" in text and "sweep_pleas_width_resnet20x1_split2.png)" in text
    # notes are included in a fixed order with nested headings; a '#' inside a code fence stays
    assert (
        text.index("## repair_mlpx1")
        < text.index("## perf_merge")
        < text.index("## matchers_zip")
        < text.index("## patch_gram")
    )
    assert "### Merge speed" in text and "\n# not a heading\n" in text


def test_report_errors(tmp_path: Path) -> None:
    report = _load("report")
    with pytest.raises(SystemExit):
        report.main(["--results-dir", str(tmp_path / "none")])
    (tmp_path / "merge_table_resnet20x1_split2_converged.json").write_text("{broken")
    with pytest.raises(ValueError, match="merge_table_resnet20x1_split2_converged.json is not valid JSON"):
        report.build_report(tmp_path, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    text = report.build_report(empty, tmp_path)
    assert text.count("not run yet:") == 2 * (len(report.TABLES) + len(report.SWEEPS))


def test_archived_tables_are_kept_apart(tmp_path: Path) -> None:
    """A table in report.ARCHIVE is printed under 'Earlier runs' with its headings nested, and never in
    the summary, the headline table or the frontiers."""
    report = _load("report")
    heading, stem = report.ARCHIVE[0]
    table = "# Merging old\n\n| method | joint |\n|---|---|\n| zipit | 41.00 |\n"
    (tmp_path / f"{stem}.md").write_text(table)
    (tmp_path / f"{stem}.json").write_text(json.dumps({"rows": [{"seeds": "0:1", "method": "zipit"}]}))
    text = report.build_report(tmp_path, tmp_path)
    summary, earlier = text.split("## Earlier runs, for the record")
    assert heading not in summary and "41.00" not in summary
    assert f"### {heading}\n\n#### Merging old" in earlier and "| zipit | 41.00 |" in earlier
    assert report.headline_entries(tmp_path) == [] and report.write_frontiers(tmp_path) == []
    (tmp_path / "none").mkdir()
    assert "Earlier runs" not in report.build_report(tmp_path / "none", tmp_path)  # none there: no section


def test_sweep_arguments(capsys: pytest.CaptureFixture) -> None:
    sweeps = _load("sweeps")
    assert sweeps.parse_args(["--seeds", "2:3"]).seeds == (2, 3)
    for argv, message in [
        (["--widths", "2.5"], r"--widths must lie in \[1, 2\].*2.5"),
        (["--depths", "1.5"], r"--depths are fractions in \[0, 1\], got \[1.5\]"),
        (["--split", "3", "--seeds", "0:1"], "--split 3 needs 3 seeds"),
    ]:
        with pytest.raises(SystemExit):
            sweeps.parse_args(argv)
        assert message.split(".*")[0].replace("\\", "") in capsys.readouterr().err, argv


def test_multi_dataset_tables_get_their_own_frontier(tmp_path: Path) -> None:
    """The MNIST + Fashion-MNIST tables are drawn as one family: sources under merge_table's names (so
    they are plotted as sources, not merges), one panel per file, linked from the report."""
    report = _load("report")
    rows = [
        {"seeds": "0:1", "method": "MNIST model", "joint_acc": 49.0, "rel_flops": 1.0},
        {"seeds": "0:1", "method": "Fashion-MNIST model", "joint_acc": 45.0, "rel_flops": 1.0},
        {"seeds": "0:1", "method": "ensemble (reset)", "joint_acc": 88.0, "rel_flops": 2.0},
        {"seeds": "0:1", "method": "zipit", "joint_acc": 78.0, "rel_flops": 1.0},
    ]
    for width in (1, 2):
        stem = f"multi_dataset_mnist_fmnist_mlpx{width}_converged"
        (tmp_path / f"{stem}.json").write_text(json.dumps({"arch": "mlp", "width": width, "rows": rows}))
    archived = "multi_dataset_mnist_fmnist_mlpx1"  # in report.ARCHIVE: no panel
    (tmp_path / f"{archived}.json").write_text(json.dumps({"arch": "mlp", "width": 1, "rows": rows}))
    tables = report.multi_dataset_tables(tmp_path)
    assert [t for t, _ in tables] == [
        "MNIST + Fashion-MNIST (mlp×1), converged",
        "MNIST + Fashion-MNIST (mlp×2), converged",
    ]
    assert [r["method"] for r in tables[0][1]["rows"]] == ["model A", "model B", "ensemble (reset)", "zipit"]
    kinds = {p.label: p.kind for p in report.frontier.points(tables[0][1]["rows"], 2)}
    assert kinds == {
        "model A": "source",
        "model B": "source",
        "ensemble (reset)": "treated ensemble",
        "zipit": "merge",
    }
    assert report.write_frontiers(tmp_path, tables=()) == [tmp_path / "frontier_multi_dataset.png"]
    assert "frontier_multi_dataset.png)" in "".join(report.frontier_images(tmp_path, tmp_path, ()))
