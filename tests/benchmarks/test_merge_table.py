"""benchmarks/merge_table.py on the quick MLP sources: rows, 3-way split, failures, resuming, CLI checks."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from benchmark_scripts import benchmark_script

from lightning_merge.data import MergeDataModule, TaskSplitDataModule
from lightning_merge.methods import AverageMerge, MaTS, PermuteMerge, ZipItMerge
from lightning_merge.models import PlateauRule
from lightning_merge.models.default_pair import DEFAULT_PAIR, SourceSpec, checkpoint_of


@pytest.fixture(scope="module")
def mt() -> ModuleType:
    return benchmark_script("merge_table")


@pytest.fixture(scope="module")
def table(mt: ModuleType, source_pair: Callable, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    pair = source_pair("mlp", width=0.25)
    dm = TaskSplitDataModule(calibration_size=256, eval_batch_size=1000)
    stats = str(tmp_path_factory.mktemp("stats") / "pair.safetensors")
    rows, first = mt.evaluate_merge("average", AverageMerge(), pair, dm, stats_path=stats, references=True)
    zipped, _ = mt.evaluate_merge("zipit partial@0.5", ZipItMerge(stop_at=0.5), pair, dm, stats_path=stats)
    again, _ = mt.evaluate_merge("zipit", ZipItMerge(), pair, dm, stats_path=stats)
    return rows + zipped + again, first


REFS = ["model A", "model B", "ensemble", "model A (reset)", "model B (reset)", "ensemble (reset)"]


def test_rows_hold_the_module_results_and_valid_numbers(table: tuple) -> None:
    rows, module = table
    labels = [*REFS, "average", "zipit partial@0.5", "zipit"]
    assert [r["method"] for r in rows] == labels
    by = {r["method"]: r for r in rows}
    res = module.results
    pairs = [("ensemble", "ensemble"), ("model A", "source0"), ("average", "merged")]
    pairs += [("ensemble (reset)", "ensemble_reset"), ("model B (reset)", "source1_reset")]
    for label, key in pairs:
        assert by[label]["joint_acc"] == pytest.approx(100 * res[f"{key}/joint_acc"])
        assert by[label]["task_0_acc"] == pytest.approx(100 * res[f"{key}/task0_acc"])
        assert by[label]["task_1_acc"] == pytest.approx(100 * res[f"{key}/task1_acc"])
    for r in rows:
        for tag in ("", "phs_"):  # both scoring rules on every row
            for c in ("joint_acc", "task_0_acc", "task_1_acc", "avg_task_acc"):
                assert 0 <= r[tag + c] <= 100, (r["method"], tag + c)
            assert r[f"{tag}avg_task_acc"] == pytest.approx(
                (r[f"{tag}task_0_acc"] + r[f"{tag}task_1_acc"]) / 2
            )
        assert r["error"] is None
    # the BatchNorm-free MLP: the reset changes nothing, under either rule
    for tag in ("", "phs_"):
        assert by["ensemble (reset)"][f"{tag}joint_acc"] == by["ensemble"][f"{tag}joint_acc"]
    # one shared head of fixed orthonormal class embeddings: the cosine only rescales each image's
    # scores, so the per-head softmax and the logits agree exactly on a merge
    assert by["average"]["phs_joint_acc"] == by["average"]["joint_acc"]
    assert by["average"]["rel_params"] == 1 and by["average"]["rel_flops"] == pytest.approx(1)
    for label in ("ensemble", "ensemble (reset)"):  # counted by lightning_merge.cost, like the merges
        assert by[label]["rel_params"] == pytest.approx(2) and by[label]["rel_flops"] == pytest.approx(2)
    assert by["model B"]["rel_flops"] == pytest.approx(1) and by["ensemble"]["config"] is None
    # a partial zip keeps one tail per source: more parameters and FLOPs than one model, fewer than two
    assert 1 < by["zipit partial@0.5"]["rel_params"] < 2 and 1 < by["zipit partial@0.5"]["rel_flops"] < 2
    assert by["zipit partial@0.5"]["config"]["init_args"]["stop_at"] == 0.5
    print("\nMLP×0.25 joint %: " + ", ".join(f"{r['method']} {r['joint_acc']:.2f}" for r in rows))
    assert by["ensemble"]["joint_acc"] > by["average"]["joint_acc"]
    # the statistics pass runs once for the pair; the next row loads the file
    assert [by[m]["stats"] for m in ("average", "zipit partial@0.5", "zipit")] == ["none", "pass", "cache"]


def test_csv_and_summary(mt: ModuleType, table: tuple, tmp_path: Path) -> None:
    rows, _ = table
    path = tmp_path / "t.csv"
    mt.write_csv(rows, path, 2)
    with path.open() as f:
        read = list(csv.DictReader(f))
    assert list(read[0]) == mt.columns(2) and len(read) == len(rows)
    assert float(read[2]["joint_acc"]) == pytest.approx(rows[2]["joint_acc"], abs=1e-4)
    meta = {"command": "cmd", "machine": "box", "tasks": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}
    failed = mt.failed_row("2:3", "zipit", ValueError("stuck at width 12"), None)
    md = mt.summary_markdown(rows + [{**r, "seeds": "2:3"} for r in rows[:-1]] + [failed], meta, "T")
    line = next(x for x in md.splitlines() if x.startswith("| ensemble |"))
    assert f"{rows[2]['joint_acc']:.2f} ± 0.00" in line  # two equal groups: zero spread
    assert next(x for x in md.splitlines() if x.startswith("| zipit (1 of 2 failed) |"))
    assert "| method | joint | task A | task B | avg |" in md and "task C" not in md
    assert "of the equally treated ensemble's" in md and "cmd" in md and "Machine: box" in md
    assert "| avg | phs joint | rel. params |" in md and "Sources trained for 1 epoch" in md
    alone = mt.summary_markdown(rows[:3] + [{**failed, "seeds": "0:1"}], meta, "T")
    assert "| zipit | failed: ValueError: stuck at width 12 | – |" in alone
    assert "precision" not in alone  # float32 sources: nothing to say
    mixed = mt.summary_markdown(rows[:3], {**meta, "train_precision": "bf16-mixed"}, "T")
    assert "Sources trained with Lightning precision `bf16-mixed`" in mixed


def test_three_models_every_row_kind_succeeds(mt: ModuleType, source_pair: Callable, tmp_path: Path) -> None:
    three = source_pair("mlp", width=0.25, tasks=mt.SPLITS[3], seeds=(0, 1, 2))
    dm = TaskSplitDataModule(
        tasks=[list(t) for t in mt.SPLITS[3]], calibration_size=256, eval_batch_size=1000
    )
    wanted = ["zipit", "zipit partial@0.5", "pleas w=1.5", "regmean (aligned)"]
    rows = [r for r in mt.method_rows(3, stops=(0.5,), pleas_widths=(1.5,)) if r[0] in wanted]
    meta = {"command": "cmd", "machine": "box", "tasks": [list(t) for t in mt.SPLITS[3]]}
    store = mt.ResultStore(tmp_path / "t3", meta)
    stats = lambda m: mt.stats_file(tmp_path, "t3", (0, 1, 2), m, 256)  # noqa: E731
    mt.run_group((0, 1, 2), rows, dm, lambda: three, stats, store, lambda: store.save([], "T", 3), echo=print)
    by = {r["method"]: r for r in store.rows}
    plain = ["model A", "model B", "model C", "ensemble"]
    assert list(by) == [*plain, *(f"{x} (reset)" for x in plain), *wanted]
    assert all(r["error"] is None for r in store.rows), [r["error"] for r in store.rows]
    assert (
        by["ensemble"]["rel_params"] == pytest.approx(3) and by["zipit"]["config"]["init_args"]["beta"] == 0.5
    )
    for r in store.rows:
        tasks = [r[f"task_{t}_acc"] for t in range(3)]
        assert r["avg_task_acc"] == pytest.approx(sum(tasks) / 3)
    print("\nN=3 MLP×0.25 task C %: " + ", ".join(f"{m} {by[m]['task_2_acc']:.2f}" for m in by))
    assert by["model C"]["task_2_acc"] > by["model A"]["task_2_acc"]  # C owns task C
    assert 1 < by["zipit partial@0.5"]["rel_flops"] < 3 and by["pleas w=1.5"]["rel_params"] > 1
    md = (tmp_path / "t3.md").read_text()
    assert "| task A | task B | task C |" in md and "beta=0.5" in md
    assert (
        "- regmean (aligned): `aligned(aligner=PermuteMerge(anchor=first, stop_at=None), merger=RegMean("
        in md
    )


def test_failed_rows_are_recorded_and_stored_rows_reused(
    mt: ModuleType, source_pair: Callable, tmp_path: Path
) -> None:
    pair = source_pair("mlp", width=0.25)
    dm = TaskSplitDataModule(calibration_size=256, eval_batch_size=1000)
    meta = {"command": "cmd 1", "machine": "box", "tasks": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}
    rows = [
        ("permute", lambda: PermuteMerge()),
        ("broken", lambda: ZipItMerge(widths={"no_such_point": 4})),
        ("invalid", lambda: ZipItMerge(alpha=7.0)),
    ]
    store = mt.ResultStore(tmp_path / "t", meta)
    stats = lambda m: mt.stats_file(tmp_path, "t", (0, 1), m, 256)  # noqa: E731
    loads: list[int] = []

    def sources() -> list:
        loads.append(1)
        return pair

    run = lambda st, rs: mt.run_group((0, 1), rs, dm, sources, stats, st, lambda: st.save([], "T", 2), print)  # noqa: E731
    run(store, rows)
    by = {r["method"]: r for r in store.rows}
    assert "KeyError" in by["broken"]["error"] and "no_such_point" in by["broken"]["error"]
    assert "alpha" in by["invalid"]["error"] and by["permute"]["error"] is None
    first = by["permute"]
    # a second run (reading the JSON back) reuses the stored row and references, retries the failures
    again = mt.ResultStore(tmp_path / "t", {**meta, "command": "cmd 2"})
    assert again.commands == ["cmd 1", "cmd 2"]
    run(again, rows[:1])
    assert len(loads) == 1 and again.find("0:1", "permute") == first
    # other settings under the same label are recomputed
    run(again, [("permute", lambda: PermuteMerge(anchor="mean"))])
    assert len(loads) == 2 and again.find("0:1", "permute")["config"]["init_args"]["anchor"] == "mean"
    assert mt.ResultStore(tmp_path / "t", meta, fresh=True).rows == []
    # another stem borrows the stored rows (same seeds, label, settings) without recomputing them
    other = mt.ResultStore(tmp_path / "sweep", meta, borrow=[tmp_path / "t.json", tmp_path / "absent.json"])
    run(other, [("permute", lambda: PermuteMerge(anchor="mean"))])
    got = other.find("0:1", "permute")
    assert len(loads) == 2 and got["borrowed_from"] == "t.json"
    assert got["joint_acc"] == again.find("0:1", "permute")["joint_acc"] and got in other.rows
    assert mt.ResultStore(tmp_path / "s2", meta, fresh=True, borrow=[tmp_path / "t.json"]).borrowed == []


def test_seed_groups_and_split_arguments(mt: ModuleType, capsys: pytest.CaptureFixture) -> None:
    assert mt.parse_seeds("2:3") == (2, 3) and mt.parse_seeds("0:1:2") == (0, 1, 2)
    with pytest.raises(Exception, match=r"SEED_A:SEED_B\[:SEED_C\].*'2-3'"):
        mt.parse_seeds("2-3")
    args = mt.parse_args(["--split", "3", "--pairs", "0:1:2", "3:4:5", "--no-pleas", "--rows", "zipit"])
    assert args.seeds == [(0, 1, 2), (3, 4, 5)]
    assert [x for x, _ in args.method_rows] == [
        "zipit",
        "zipit no source reset",
        "zipit partial@0.3",
        "zipit partial@0.6",
        "zipit w=1.5",
    ]
    assert mt.parse_args([]).seeds == [(0, 1)]
    for argv, message in [
        (["--split", "3", "--seeds", "0:1"], "--split 3 needs 3 seeds per group.*'0:1'"),
        (["--rows", "nope"], r"--rows \['nope'\] match no row"),
        (["--split", "4"], "invalid choice: 4"),
    ]:
        with pytest.raises(SystemExit):
            mt.parse_args(argv)
        assert re.search(message, capsys.readouterr().err), argv


def test_default_rows(mt: ModuleType) -> None:
    labels = [x for x, _ in mt.method_rows()]
    assert labels[:4] == ["average", "weight_matching", "permute", "zipit"]
    assert [x for x in labels if x.startswith("pleas")] == [
        "pleas w=1",
        "pleas w=1.25",
        "pleas w=1.5",
        "pleas w=1.75",
        "pleas budget=1.5",
        "pleas budget=1.75",
        "pleas w=1.5 propagated",
        "pleas-free w=1.5",
    ]
    assert {"zipit no source reset", "mudsc no source reset", "mudsc λ search"} <= set(labels)
    rows = dict(mt.method_rows())
    assert not rows["zipit no source reset"]().reset_sources and rows["zipit"]().reset_sources
    assert rows["mudsc λ search"]().lam_search and rows["pleas budget=1.75"]().budget == 1.75
    assert labels[-2:] == ["regmean (aligned)", "mats (aligned)"]
    assert not any(x.startswith("pleas") for x, _ in mt.method_rows(pleas_widths=()))
    mats = dict(mt.method_rows())["mats (aligned)"]()
    assert isinstance(mats.merger, MaTS) and (mats.merger.subspace, mats.merger.iterations) == (
        "regmean",
        100,
    )


def test_sources_share_the_cache_keys_of_the_trained_specs(mt: ModuleType) -> None:
    two = mt.group_specs((0, 1), mt.SPLITS[2], "resnet20", 1.0)
    assert [checkpoint_of(s) for s in two] == [checkpoint_of(s) for s in DEFAULT_PAIR]
    three = mt.group_specs((3, 4, 5), mt.SPLITS[3], "resnet20", 1.0)
    expected = [SourceSpec(classes=c, seed=s) for c, s in zip(mt.SPLITS[3], (3, 4, 5), strict=True)]
    assert [checkpoint_of(s) for s in three] == [checkpoint_of(s) for s in expected]
    vgg = mt.group_specs((2, 3), mt.SPLITS[2], "vgg11_bn", 0.5)
    assert vgg[1] == SourceSpec(classes=(5, 6, 7, 8, 9), seed=3, arch="vgg11_bn", width=0.5)
    with pytest.raises(ValueError, match="seed group 0:1 has 2 seeds for 3 tasks"):
        mt.group_specs((0, 1), mt.SPLITS[3], "resnet20", 1)
    mixed = mt.group_specs((0, 1), mt.SPLITS[2], "resnet20", 4, precision="bf16-mixed")
    assert [s.precision for s in mixed] == ["bf16-mixed"] * 2
    plain = mt.group_specs((0, 1), mt.SPLITS[2], "resnet20", 4)
    assert {checkpoint_of(s) for s in mixed}.isdisjoint(checkpoint_of(s) for s in plain)


def test_main_writes_the_three_files_and_resumes(
    mt: ModuleType, source_pair: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = source_pair("mlp", width=0.25)
    calls: list[tuple] = []
    monkeypatch.setattr(mt, "group_sources", lambda *a, **k: calls.append(a) or pair)  # no training
    argv = ["--arch", "mlp", "--width", "0.25", "--rows", "average", "--out-dir", str(tmp_path)]
    argv += ["--stats-dir", str(tmp_path), "--calibration-size", "256"]
    rows = mt.main(argv)
    stem = tmp_path / "merge_table_mlpx0.25_split2"
    assert [r["method"] for r in rows] == [*REFS, "average"]
    files = {ext: tmp_path / f"{stem.name}.{ext}" for ext in ("json", "csv", "md")}
    data = json.loads(files["json"].read_text())
    assert data["rows"] == rows and data["command"].endswith(" ".join(argv)) and data["zip"]["beta"] == 0.125
    assert files["csv"].is_file() and "| average |" in files["md"].read_text()
    assert data["train_precision"] == "32-true" and calls[0][-1] is None
    assert mt.main(argv) == rows  # everything reused: identical rows, seconds included
    mt.main([*argv, "--train-precision", "bf16-mixed", "--fresh"])
    assert calls[-1][-1] == "bf16-mixed"  # the sources' training precision reaches group_sources


def test_store_files_keep_a_dotted_stem(mt: ModuleType, tmp_path: Path) -> None:
    """A width of 0.5 puts a dot in the stem; the files must not lose the text after it."""
    meta = {"command": "c", "machine": "m", "tasks": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}
    store = mt.ResultStore(tmp_path / "merge_table_vgg11_bnx0.5_split2", meta)
    store.put([mt.failed_row("0:1", "zipit", ValueError("boom"), None)])
    store.save([], "T", 2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [f"merge_table_vgg11_bnx0.5_split2.{ext}" for ext in ("csv", "json", "md")]
    again = mt.ResultStore(tmp_path / "merge_table_vgg11_bnx0.5_split2", meta)
    assert [r["method"] for r in again.rows] == ["zipit"] and "boom" in again.rows[0]["error"]


def test_rows_missing_a_seed_group_are_left_out_of_the_verdict(mt: ModuleType) -> None:
    """A resumed run stopped midway: PLeaS has only group 0:1, where it scores highest of all."""

    def row(seeds: str, label: str, joint: float, params: float = 1.0) -> dict:
        acc = {"joint_acc": joint / 100, "task0_acc": 0.5, "task1_acc": 0.5}
        return mt._row(seeds, label, acc, 2, (params, params), 1.0, "none", None)

    rows = []
    for seeds, shift in (("0:1", 0.0), ("2:3", 10.0)):
        rows += [row(seeds, "model A", 40), row(seeds, "model B", 40), row(seeds, "ensemble", 60, 2)]
        rows += [row(seeds, "average", 20 + shift), row(seeds, "zipit", 30 + shift)]
    rows.append(row("0:1", "pleas w=1.5", 90, 2.2))
    assert mt.missing_groups(rows)["pleas w=1.5"] == ["2:3"] and mt.missing_groups(rows)["zipit"] == []
    v = mt.verdict(rows, 2)
    assert v["best"] == "zipit" and v["best_joint"] == pytest.approx(35)
    assert v["incomplete"] == ["pleas w=1.5"]
    assert mt.headline(rows, 2)["picks"][1]["method"] == "zipit"  # not PLeaS, seen on one group only
    assert v["not_above_average"] == [] and v["failed"] == []
    meta = {"command": "cmd", "machine": "box", "tasks": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}
    md = mt.summary_markdown(rows, meta, "T")
    assert "| pleas w=1.5 (seeds 0:1 only) | 90.00 |" in md and "| zipit | 35.00 ± 7.07 |" in md
    assert "left out of the comparisons above: ['pleas w=1.5']" in md


def test_two_runs_on_one_table_keep_each_others_rows(mt: ModuleType, tmp_path: Path) -> None:
    """Runs on different rows of one table (e.g. PLeaS rows beside the rest) save into one file."""
    meta = {"machine": "box", "tasks": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}
    first = mt.ResultStore(tmp_path / "t", {**meta, "command": "run 1"})
    second = mt.ResultStore(tmp_path / "t", {**meta, "command": "run 2"})  # both read an empty file
    first.put([mt.failed_row("0:1", "zipit", ValueError("a"), None)])
    first.save([], "T", 2)
    second.put([mt.failed_row("0:1", "pleas w=1.5", ValueError("b"), None)])
    second.save([], "T", 2)
    first.put([mt.failed_row("2:3", "zipit", ValueError("c"), None)])
    first.save([], "T", 2)
    data = json.loads((tmp_path / "t.json").read_text())
    got = {(r["seeds"], r["method"]): r["error"] for r in data["rows"]}
    assert got == {
        ("0:1", "zipit"): "ValueError: a",
        ("0:1", "pleas w=1.5"): "ValueError: b",
        ("2:3", "zipit"): "ValueError: c",
    }
    assert data["commands"] == ["run 2", "run 1"] and data["command"] == "run 1"
    # a clash: the saving run's own row wins over what the other run wrote
    second.put([mt.failed_row("0:1", "zipit", ValueError("d"), None)])
    second.save([], "T", 2)
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert {(r["seeds"], r["method"]): r["error"] for r in rows}[("0:1", "zipit")] == "ValueError: d"
    assert len(rows) == 3


def test_a_fresh_run_replaces_the_stored_rows_and_still_keeps_a_concurrent_runs(
    mt: ModuleType, tmp_path: Path
) -> None:
    """--fresh: the rows on disk at its start never come back on a save (they came back once, and a
    "fresh" table mixed old-code rows into its means); rows another run writes meanwhile are kept."""
    meta = {"machine": "box", "tasks": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}
    old = mt.ResultStore(tmp_path / "t", {**meta, "command": "old"})
    old.put([mt.failed_row("2:3", "zipit", ValueError("old"), None)])
    old.save([], "T", 2)
    fresh = mt.ResultStore(tmp_path / "t", {**meta, "command": "fresh"}, fresh=True)
    other = mt.ResultStore(tmp_path / "t", {**meta, "command": "other"})
    fresh.put([mt.failed_row("0:1", "zipit", ValueError("new"), None)])
    fresh.save([], "T", 2)
    other.put([mt.failed_row("4:5", "permute", ValueError("meanwhile"), None)])
    other.save([], "T", 2)
    fresh.save([], "T", 2)
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert sorted((r["seeds"], r["error"]) for r in rows) == [
        ("0:1", "ValueError: new"),
        ("4:5", "ValueError: meanwhile"),
    ]


def test_averaging_is_compared_on_joint_and_on_the_per_task_average(mt: ModuleType) -> None:
    """'collapsed' predicts one task only: higher joint than averaging, lower per-task average."""

    def row(label: str, joint: float, t0: float, t1: float) -> dict:
        acc = {"joint_acc": joint / 100, "task0_acc": t0 / 100, "task1_acc": t1 / 100}
        return mt._row("0:1", label, acc, 2, (1.0, 1.0), 1.0, "none", None)

    rows = [row("model A", 46, 92, 15), row("model B", 48, 20, 96), row("ensemble", 60, 92, 96)]
    rows += [row("average", 30, 40, 50), row("collapsed", 40, 10, 80), row("zipit", 35, 60, 70)]
    v = mt.verdict(rows, 2)
    assert v["not_above_average"] == [] and v["not_above_average_tasks"] == ["collapsed"]
    assert mt.beats_average(v) == "on joint accuracy every merge; on the per-task average all but collapsed"
    md = mt.summary_markdown(
        rows, {"command": "c", "machine": "m", "tasks": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}, "T"
    )
    assert (
        "Beats weight averaging: on joint accuracy every merge; on the per-task average all but collapsed."
        in md
    )


def test_render_rewrites_the_summary_from_the_json_alone(mt: ModuleType, tmp_path: Path) -> None:
    meta = {"command": "c", "machine": "m", "tasks": [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]}
    meta |= {"arch": "resnet20", "width": 1.0, "split": 2}
    stem = tmp_path / mt.table_stem("resnet20", 1.0, 2)
    store = mt.ResultStore(stem, meta)
    acc = {"joint_acc": 0.5, "task0_acc": 0.6, "task1_acc": 0.7}
    store.put([mt._row("0:1", "zipit", acc, 2, (1.0, 1.0), 1.0, "none", None)])
    store.save(["zipit"], "old title", 2)
    md = tmp_path / f"{stem.name}.md"
    md.write_text("stale")
    rows = mt.main(["--render", "--out-dir", str(tmp_path)])
    assert [r["method"] for r in rows] == ["zipit"]
    text = md.read_text()
    assert text.startswith("# Merging resnet20×1 on Fashion-MNIST, 2 tasks") and "| zipit | 50.00 |" in text
    mt.main(["--render", "--out-dir", str(tmp_path), "--note", "Rows of an older method."])
    assert "\nRows of an older method.\n" in md.read_text()
    assert json.loads((tmp_path / f"{stem.name}.json").read_text())["rows"][0]["method"] == "zipit"
    with pytest.raises(FileNotFoundError, match="merge_table_resnet20x4_split2.json"):
        mt.main(["--render", "--out-dir", str(tmp_path), "--width", "4"])


def test_the_second_rule_is_scored_like_the_module_scores_the_first(mt: ModuleType, table: tuple) -> None:
    """``rule_scores`` (outside the Trainer) under the module's own rule gives the module's numbers."""
    _, module = table
    data = MergeDataModule(TaskSplitDataModule(calibration_size=256, eval_batch_size=1000))
    again = mt.rule_scores(module, data, "logits", references=True)
    assert set(again) == set(module.results) and "ensemble_reset/joint_acc" in again
    assert again == pytest.approx(module.results, abs=1e-12)
    phs = mt.rule_scores(module, data, "per_head_softmax", references=False)
    assert set(phs) == {"merged/phs_joint_acc", "merged/phs_task0_acc", "merged/phs_task1_acc"}


def test_converged_sources_flags_specs_and_stems(mt: ModuleType, capsys: pytest.CaptureFixture) -> None:
    args = mt.parse_args(["--converged"])
    assert args.training == mt.SourceTraining(30, PlateauRule(min_epochs=8), "plateau")
    assert args.training.suffix == "_converged" and mt.parse_args([]).training == mt.SourceTraining(1)
    assert mt.parse_args(["--plateau", "--max-epochs", "12"]).training.plateau.min_epochs == 8
    one_cycle = mt.parse_args(["--plateau", "--max-epochs", "30"]).training  # rule from 2/3 of the cap
    assert one_cycle == mt.SourceTraining(30, PlateauRule(min_epochs=20))
    assert mt.parse_args(["--max-epochs", "5"]).training.suffix == "_e5"
    assert mt.parse_args(["--converged", "--min-epochs", "4"]).training.plateau.min_epochs == 4
    for argv, message in [
        (["--min-epochs", "4"], "--min-epochs is the plateau rule's"),
        (["--plateau", "--max-epochs", "5", "--min-epochs", "9"], "min_epochs 9 exceeds max_epochs 5"),
        (["--max-epochs", "0"], "max_epochs must be >= 1"),
    ]:
        with pytest.raises(SystemExit):
            mt.parse_args(argv)
        assert message in capsys.readouterr().err, argv
    specs = mt.group_specs((0, 1), mt.SPLITS[2], "resnet20", 1, training=args.training)
    assert all(s.max_epochs == 30 and s.plateau == PlateauRule(min_epochs=8) for s in specs)
    assert all(s.model_kwargs == {"head": "embedding", "lr": 0.1, "schedule": "plateau"} for s in specs)
    assert (
        args.training.as_dict()["schedule"] == "plateau" and "schedule" not in mt.SourceTraining(1).as_dict()
    )
    # converged sources have their own cache keys: never the one-epoch checkpoints
    assert {checkpoint_of(s) for s in specs}.isdisjoint(checkpoint_of(s) for s in DEFAULT_PAIR)


def test_results_carry_the_sources_curves_and_refuse_other_training(
    mt: ModuleType, source_pair: Callable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = source_pair("mlp", width=0.25)
    monkeypatch.setattr(mt, "group_sources", lambda *a, **k: pair)  # no training
    cache = tmp_path / "cache"
    training = mt.SourceTraining(4, PlateauRule(min_epochs=2))
    for spec in mt.group_specs((0, 1), mt.SPLITS[2], "mlp", 0.25, training=training):
        path = checkpoint_of(spec, cache)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"epochs": 3, "val_acc_curve": [0.9, 0.95, 0.951], "final_val_acc": 0.951}
        path.with_suffix(".json").write_text(json.dumps(record | {"plateau_met": True, "other": 1}))
    argv = ["--arch", "mlp", "--width", "0.25", "--rows", "average", "--out-dir", str(tmp_path)]
    argv += ["--stats-dir", str(tmp_path), "--calibration-size", "256", "--cache-dir", str(cache)]
    mt.main([*argv, "--plateau", "--max-epochs", "4", "--min-epochs", "2"])
    stem = tmp_path / "merge_table_mlpx0.25_split2_converged"
    data = json.loads(stem.with_name(stem.name + ".json").read_text())
    assert data["source_training"] == {"max_epochs": 4, "plateau": training.plateau.as_dict()}
    (a, b) = data["sources"]["0:1"]
    assert a["val_acc_curve"] == [0.9, 0.95, 0.951] and a["epochs"] == 3 and "other" not in a
    assert a["checkpoint"].startswith("mlp_w0.25_c0-1-2-3-4_s0_") and b["checkpoint"].startswith(
        "mlp_w0.25_c5"
    )
    md = stem.with_name(stem.name + ".md").read_text()
    assert "- seeds 0:1: 3 ep, val 95.10%, plateau met; 3 ep, val 95.10%, plateau met" in md
    assert "Sources trained until validation accuracy gained < 0.3 points" in md
    with pytest.raises(SystemExit, match="trained with"):  # same stem, other rule: not mixed in
        mt.main([*argv, "--plateau", "--max-epochs", "4", "--min-epochs", "3"])


def test_rows_with_equals_sign_match_one_label(mt: ModuleType) -> None:
    args = mt.parse_args(["--rows", "=zipit", "=permute", "pleas", "--pleas-widths", "1"])
    assert [x for x, _ in args.method_rows] == [
        "permute",
        "zipit",
        "pleas w=1",
        "pleas budget=1.5",
        "pleas budget=1.75",
        "pleas w=1.5 propagated",
        "pleas-free w=1.5",
    ]
    with pytest.raises(ValueError, match=r"--rows \['=zip'\] match no row"):
        mt.select_rows(mt.method_rows(2), ["=zip"])


def test_sources_lines_name_the_plateau_schedule(mt: ModuleType) -> None:
    rule = PlateauRule(min_epochs=8).as_dict()
    record = {"epochs": 15, "final_val_acc": 0.9501, "plateau_met": True}
    meta = {"source_training": {"max_epochs": 30, "plateau": rule, "schedule": "plateau"}}
    lines = mt.sources_lines(meta | {"sources": {"0:1": [record, record | {"plateau_met": False}]}})
    assert "(from epoch 8, at most 30); learning rate ×0.1 on each validation stall" in lines[0]
    assert lines[1] == "- seeds 0:1: 15 ep, val 95.01%, plateau met; 15 ep, val 95.01%, plateau NOT met"
    one_cycle = mt.sources_lines({"source_training": {"max_epochs": 30, "plateau": rule}})
    assert "learning rate" not in one_cycle[0]
