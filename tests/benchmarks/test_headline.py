"""The tables' headline on hand-made rows: FLOPs budgets, the treated ensemble as the denominator, and
no claim of passing the ensemble unless a merge does so under equal treatment at no more cost."""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from types import ModuleType

import pytest
from benchmark_scripts import benchmark_script

TASKS = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


@pytest.fixture(scope="module")
def mt() -> ModuleType:
    return benchmark_script("merge_table")


def row(mt: ModuleType, seeds: str, label: str, joint: float, flops: float, phs: float | None = None) -> dict:
    acc = {"joint_acc": joint / 100, "task0_acc": 0.5, "task1_acc": 0.5}
    if phs is not None:
        acc |= {"phs_joint_acc": phs / 100, "phs_task0_acc": 0.5, "phs_task1_acc": 0.5}
    return mt._row(seeds, label, acc, 2, (flops, flops), 1.0, "none", None)


def table(mt: ModuleType, merges: dict[str, tuple[float, float]], treated: float | None = 81.3) -> list[dict]:
    """Two seed groups with the same numbers: sources, untreated ensemble 66.3 %, treated ``treated``."""
    rows = []
    for seeds in ("0:1", "2:3"):
        rows += [row(mt, seeds, "model A", 45, 1), row(mt, seeds, "model B", 46, 1)]
        rows.append(row(mt, seeds, "ensemble", 66.3, 2))
        if treated is not None:
            rows.append(row(mt, seeds, "ensemble (reset)", treated, 2))
        rows += [row(mt, seeds, m, j, f) for m, (j, f) in merges.items()]
    return rows


def test_each_budget_takes_the_best_merge_within_it(mt: ModuleType) -> None:
    merges = {"pleas w=1.75": (85.0, 3.06), "zipit partial@0.3": (78.0, 1.6), "zipit": (70.0, 1.0)}
    merges["average"] = (50.0, 1.0)
    h = mt.headline(table(mt, merges), 2)
    one, two = h["picks"]
    assert (one["budget"], one["method"], one["joint"], one["rel_flops"]) == (1.0, "zipit", 70.0, 1.0)
    assert (two["method"], two["joint"]) == ("zipit partial@0.3", 78.0)  # PLeaS at 3.06× is over budget
    # the denominator is the equally treated ensemble (81.3 %), not the untreated one (66.3 %)
    assert one["of_treated_ensemble"] == pytest.approx(70 / 81.3)
    assert two["of_treated_ensemble"] == pytest.approx(78 / 81.3)
    assert h["treated_ensemble"] == pytest.approx(81.3) and h["untreated_ensemble"] == pytest.approx(66.3)
    assert not one["passes"] and not two["passes"]
    text = "\n".join(mt.headline_lines(table(mt, merges), 2))
    assert "above the equally treated ensemble at" not in text and "not above" in text
    assert f"{100 * 78 / 81.3:.1f}% of the equally treated ensemble's" in text
    assert f"{100 * 78 / 66.3:.1f}" not in text and "pleas" not in text


def test_a_merge_passes_only_above_the_treated_ensemble_at_no_more_cost(mt: ModuleType) -> None:
    # 83 % beats the untreated (66.3) and the treated (81.3) ensemble at one source's FLOPs
    h = mt.headline(table(mt, {"zipit": (83.0, 1.0)}), 2)
    assert all(p["passes"] and p["method"] == "zipit" for p in h["picks"])
    assert "above the equally treated ensemble at no more than its FLOPs" in "\n".join(
        mt.headline_lines(table(mt, {"zipit": (83.0, 1.0)}), 2)
    )
    # above the untreated ensemble only: no pass
    assert not any(p["passes"] for p in mt.headline(table(mt, {"zipit": (75.0, 1.0)}), 2)["picks"])
    # above the treated ensemble but at more FLOPs than its 2×: no pass even inside a 3× budget
    wide = mt.headline(table(mt, {"pleas w=1.75": (90.0, 2.5)}), 2, budgets=(3.0,))
    assert wide["picks"][0]["method"] == "pleas w=1.75" and not wide["picks"][0]["passes"]


def test_without_a_treated_ensemble_on_every_group_there_is_no_fraction(mt: ModuleType) -> None:
    rows = table(mt, {"zipit": (83.0, 1.0)}, treated=None)
    h = mt.headline(rows, 2)
    assert math.isnan(h["treated_ensemble"]) and h["untreated_ensemble"] == pytest.approx(66.3)
    assert all(math.isnan(p["of_treated_ensemble"]) and not p["passes"] for p in h["picks"])
    text = "\n".join(mt.headline_lines(rows, 2))
    assert text.startswith("No equally treated ensemble") and "% of the" not in text
    # treated on one of the two groups only: still no comparison
    partial = table(mt, {"zipit": (83.0, 1.0)}, treated=None) + [row(mt, "0:1", "ensemble (reset)", 81.3, 2)]
    assert math.isnan(mt.headline(partial, 2)["treated_ensemble"])


def test_a_budget_must_hold_on_every_seed_group(mt: ModuleType) -> None:
    rows = table(mt, {"zipit": (70.0, 1.0)})
    rows = [r if r["method"] != "zipit" or r["seeds"] == "0:1" else {**r, "rel_flops": 1.2} for r in rows]
    assert mt.headline(rows, 2)["picks"][0]["method"] is None
    assert mt.headline(rows, 2)["picks"][1]["rel_flops"] == pytest.approx(1.2)
    assert "No merge at ≤ 1× a source's FLOPs" in "\n".join(mt.headline_lines(rows, 2))


def test_the_headline_rule_is_chosen_and_the_other_rule_is_reported(mt: ModuleType) -> None:
    rows = []
    for seeds in ("0:1", "2:3"):
        rows += [
            row(mt, seeds, "ensemble (reset)", 81.3, 2, phs=73.8),
            row(mt, seeds, "ensemble", 66.3, 2, 73),
        ]
        rows += [row(mt, seeds, "zipit", 70, 1, phs=72.0), row(mt, seeds, "average", 60, 1, phs=74.0)]
    phs = mt.headline(rows, 2, "per_head_softmax")
    assert phs["picks"][0]["method"] == "average" and phs["picks"][0]["passes"]  # 74.0 > 73.8 at 1×
    assert phs["picks"][0]["of_treated_ensemble"] == pytest.approx(74 / 73.8)
    logits = mt.headline(rows, 2)
    assert logits["picks"][0]["method"] == "zipit" and not logits["picks"][0]["passes"]
    text = "\n".join(mt.headline_lines(rows, 2))
    assert "Under per-head softmax, of its treated ensemble: ≤ 1×: average 100.3%" in text
    with pytest.raises(ValueError, match="scoring must be one of"):
        mt.headline(rows, 2, "softmax")


def test_frontier_points_and_step_line(mt: ModuleType, tmp_path: Path) -> None:
    frontier = importlib.import_module("frontier")
    merges = {"pleas w=1.75": (85.0, 3.06), "zipit partial@0.3": (78.0, 1.6), "zipit": (70.0, 1.0)}
    merges |= {"average": (50.0, 1.0), "zipit w=1.5": (64.0, 2.25)}
    rows = table(mt, merges) + [row(mt, "0:1", "pleas w=1.5", 99.0, 2.2)]  # one group only: left out
    pts = {p.label: p for p in frontier.points(rows, 2)}
    assert "pleas w=1.5" not in pts and pts["zipit"].std == 0.0
    kinds = {label: p.kind for label, p in pts.items()}
    assert kinds["model A"] == "source" and kinds["ensemble (reset)"] == "treated ensemble"
    assert kinds["ensemble"] == "ensemble" and kinds["zipit w=1.5"] == "merge"
    merged = [p for p in pts.values() if p.kind == "merge"]
    assert frontier.frontier(merged) == [(1.0, 70.0), (1.6, 78.0), (3.06, 85.0)]  # zipit w=1.5 is dominated
    data = {"rows": rows, "tasks": TASKS}
    png = frontier.plot_family([("T", data), ("empty", {"rows": [], "tasks": TASKS})], tmp_path / "f.png")
    assert png == tmp_path / "f.png" and png.read_bytes()[:4] == b"\x89PNG"
    assert frontier.plot_family([("empty", {"rows": [], "tasks": TASKS})], tmp_path / "g.png") is None


def test_headline_table_rows_carry_the_headline_numbers(mt: ModuleType) -> None:
    """report.py's one-row-per-table summary (BENCHMARKS.md and README's block): the treated and the
    untreated ensemble, the best merge per budget with its fraction, the tables it must leave out."""
    report = benchmark_script("report")
    merges = {"pleas w=1.75": (85.0, 1.94), "zipit": (70.0, 1.0), "average": (50.0, 1.0)}
    records = {"0:1": [{"plateau_met": True}] * 2, "2:3": [{"plateau_met": True}] * 2}
    training = {"plateau": {"window": 0.25}}
    converged = {"rows": table(mt, merges), "tasks": TASKS, "source_training": training, "sources": records}
    passing = {"rows": table(mt, {"pleas w=1.5": (82.0, 1.5)}), "tasks": TASKS}
    old = {"rows": table(mt, merges, treated=None), "tasks": TASKS, "source_training": {"max_epochs": 3}}
    entries = [("A", converged, (1.0, 2.0)), ("B", passing, (1.02, 2.0)), ("C", old, (1.0, 2.0))]
    lines = report.headline_table(entries)
    a, b = (next(x for x in lines if x.startswith(f"| {t} |")) for t in "AB")
    assert a.startswith("| A | converged | 2 | 81.30 (66.30) | zipit at 1.00×: 70.00 = ")
    two = f"pleas w=1.75 at 1.94×: 85.00 = **{100 * 85 / 81.3:.1f} %** (above it) |"
    assert f"= **{100 * 70 / 81.3:.1f} %** | {two}" in a
    assert b.split(" | ")[1:3] == ["1 epoch", "2"]
    assert "| – | pleas w=1.5 at 1.50×: 82.00" in b  # no merge within 1.02×
    assert not any(x.startswith("| C |") for x in lines)
    missing = "No equally treated ensemble on every seed group (reference rows missing: rerun it): C."
    assert lines[-1] == missing
    assert report.sources_label(old) == "3 epochs"
    records["0:1"] = [{"plateau_met": True}, {"plateau_met": False}]
    assert report.sources_label(converged | {"sources": records}) == "to a plateau (3 of 4 met the rule)"
    assert report.sources_label(converged | {"sources": {}}) == "to a plateau (no training records)"


def test_readme_block_is_replaced_between_its_markers() -> None:
    report = benchmark_script("report")
    text = f"intro\n{report.README_BEGIN}\nold table\n{report.README_END}\noutro\n"
    new = report.replace_block(text, ["| t |", "|---|"], "README.md")
    assert new == f"intro\n{report.README_BEGIN}\n| t |\n|---|\n{report.README_END}\noutro\n"
    assert report.replace_block(new, ["| t |", "|---|"], "README.md") == new  # idempotent
    with pytest.raises(ValueError, match="README.md lacks the lines"):
        report.replace_block("no markers here", ["x"], "README.md")
