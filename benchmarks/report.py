"""Assemble BENCHMARKS.md from the files in benchmarks/results/ (no number is typed by hand).

    .venv/bin/python benchmarks/report.py [--results-dir benchmarks/results] [--out BENCHMARKS.md]

Reads the merge tables (``merge_table_*.{json,md}``), the sweeps (``sweep_*.{json,md,png}``), the
MNIST + Fashion-MNIST table (``multi_dataset*.md``), the same-base merges (``same_base*.md``), the
REPAIR comparison (``repair*.md``) and the performance notes other scripts leave there (``perf*.md``,
``matchers*.md``, ``stats_pass*.md``, ``whole_merge*.md``, ``reset_cost*.md``, ``patch_gram*.md``).
The intro lists, per table, the command that regenerates it (from its JSON), the machine, the
headline (the best merge at ≤ 1× and ≤ 2× a source's FLOPs as a fraction of the equally treated
ensemble's joint accuracy, ``merge_table.headline``) and which merges beat weight averaging (on joint
accuracy and on the per-task average). It also draws one cost/quality frontier per table family
(``frontier_<arch>.png``, joint accuracy vs relative FLOPs for every row; ``frontier.py``).
A missing input becomes a line ``not run yet: <command>``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import frontier
import merge_table as mt
import multi_dataset as md

PY = ".venv/bin/python"
TABLE_CMD = f"{PY} benchmarks/merge_table.py"
#: (heading, output stem, command that writes it), in the order they appear.
TABLES: tuple[tuple[str, str, str], ...] = (
    (
        "ResNet-20×1, 2 models (5+5 classes), converged sources",
        "merge_table_resnet20x1_split2_converged",
        f"{TABLE_CMD} --arch resnet20 --width 1 --split 2 --seeds 0:1 2:3 4:5 --converged"
        " --rows average =weight_matching =permute =zipit '=zipit partial@0.3' =mudsc '=mudsc λ search'"
        " '=pleas w=1' '=pleas w=1.5' '=pleas w=1.75' '=pleas budget=1.5' '=pleas budget=1.75'"
        " '=pleas w=1.5 propagated' '=pleas-free w=1.5'",
    ),
    (
        "VGG-11 (BN, width ×0.5), 2 models (5+5 classes), converged sources",
        "merge_table_vgg11_bnx0.5_split2_converged",
        f"{TABLE_CMD} --arch vgg11_bn --width 0.5 --split 2 --seeds 0:1 2:3 4:5 --converged"
        " --rows average =weight_matching =permute =zipit '=zipit partial@0.3' =mudsc '=pleas w=1'"
        " '=pleas w=1.5' '=pleas w=1.75'",
    ),
    (
        "ResNet-20×1, 3 models (3+3+4 classes), converged sources",
        "merge_table_resnet20x1_split3_converged",
        f"{TABLE_CMD} --arch resnet20 --width 1 --split 3 --seeds 0:1:2 3:4:5 6:7:8 --converged"
        " --rows average =weight_matching =permute =zipit '=zipit partial@0.3' =mudsc '=mudsc λ search'"
        " '=pleas w=1' '=pleas w=1.5'",
    ),
    (
        "ViT (patch 7, 4×128), 2 models (5+5 classes), converged sources",
        "merge_table_vitx1_split2_converged",
        f"{TABLE_CMD} --arch vit --width 1 --split 2 --seeds 0:1 2:3 4:5 --converged"
        " --pleas-widths 1 --rows average =permute =zipit =mudsc '=pleas w=1'",
    ),
)
#: Results kept for the record only (heading, output stem): sources not trained to the plateau rule
#: (short runs, or a 15-epoch cap that left two ViT sources short of it), and the oldest from before
#: the equally treated references and the sources' training records. They stay out of the summary and
#: the frontiers; their JSON keeps the commands that wrote them.
ARCHIVE: tuple[tuple[str, str], ...] = (
    ("ResNet-20×1, 2 models (5+5 classes), one-epoch sources", "merge_table_resnet20x1_split2"),
    ("ViT (patch 7, 4×128), 2 models (5+5 classes), three-epoch sources", "merge_table_vitx1_split2_e3"),
    ("ViT pair, warmup + cosine, 15-epoch cap (4 of 6 met the rule)", "merge_table_vitx1_split2_plateau15"),
    ("MNIST + Fashion-MNIST, one 20-class MLP, one-epoch sources", "multi_dataset_mnist_fmnist_mlpx1"),
    ("Same-base merges (MLP), short runs", "same_base_mlp"),
    ("ResNet-20×4, 2 models (5+5), bf16-mixed one-epoch sources", "merge_table_resnet20x4_split2"),
    ("VGG-11 (BN, width ×0.5), 2 models (5+5 classes), one-epoch sources", "merge_table_vgg11_bnx0.5_split2"),
    ("VGG-11 (BN, full width), 5+5, bf16-mixed one-epoch sources", "merge_table_vgg11_bnx1_split2"),
    ("ResNet-20×1, 3 models (3+3+4 classes), one-epoch sources", "merge_table_resnet20x1_split3"),
)
ARCHIVED = frozenset(stem for _, stem in ARCHIVE)
SWEEPS: tuple[tuple[str, str, str], ...] = (
    (
        "ResNet-20×1 sweeps: merged width and partial-zip depth",
        "sweep_resnet20x1_split2",
        f"{PY} benchmarks/sweeps.py --arch resnet20 --width 1 --seeds 0:1",
    ),
)
#: Other scripts' notes, included in this order (files of one prefix sorted by name).
#: The first three are results (before the archived tables), the rest performance notes (after them).
RESULT_PREFIXES = ("multi_dataset", "same_base", "repair")
EXTRA_PREFIXES = (
    *RESULT_PREFIXES,
    "perf",
    "matchers",
    "stats_pass",
    "whole_merge",
    "reset_cost",
    "patch_gram",
)


def demote(markdown: str, levels: int = 2) -> str:
    """Push every heading ``levels`` deeper (outside code fences), so an included file nests."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        out.append("#" * levels + line if not fenced and line.startswith("#") else line)
    return "\n".join(out).strip() + "\n"


def not_run(command: str) -> str:
    return f"not run yet: `{command}`"


def load_json(path: Path) -> dict[str, Any] | None:
    """The results JSON, or None when absent; a corrupt file names itself in the error."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); rerun the command that writes it") from err


def table_summary(heading: str, data: dict[str, Any]) -> list[str]:
    """The intro lines of one table: the headline (best merge at ≤ 1× and ≤ 2× a source's FLOPs as a
    fraction of the equally treated ensemble), merges vs weight averaging, failures, commands."""
    num_tasks = len(data["tasks"])
    v = mt.verdict(data["rows"], num_tasks)
    groups = list(dict.fromkeys(r["seeds"] for r in data["rows"]))
    lines = [f"- **{heading}** ({len(groups)} seed group{'s' * (len(groups) != 1)}: {', '.join(groups)})"]
    rule = data.get("headline_scoring", mt.HEADLINE_SCORING)
    lines += [f"  - {line}" for line in mt.headline_lines(data["rows"], num_tasks, rule)]
    if v["has_average"]:
        lines.append(f"  - beats weight averaging: {mt.beats_average(v)}")
    if v["failed"]:
        lines.append(f"  - failed rows: {', '.join(v['failed'])}")
    if v["incomplete"]:
        lines.append(f"  - not yet run on every seed group (left out above): {', '.join(v['incomplete'])}")
    lines += [f"  - regenerate: `{c}`" for c in data.get("commands", [data["command"]])]
    return lines


def family(stem: str) -> str:
    """A table's family (its architecture): ``merge_table_vgg11_bnx0.5_split2`` → ``vgg11_bn``."""
    return stem.removeprefix("merge_table_").rpartition("_split")[0].rpartition("x")[0] or stem


#: multi_dataset.py's reference rows under merge_table's names (the frontier's point kinds).
MULTI_DATASET_NAMES = {"MNIST model": "model A", "Fashion-MNIST model": "model B"}
MULTI_DATASET = "multi_dataset"


def multi_dataset_tables(results: Path) -> list[tuple[str, dict[str, Any]]]:
    """multi_dataset.py's tables as merge_table-shaped data (two tasks: digits, clothes), one panel each."""
    out = []
    for path in sorted(results.glob(f"{MULTI_DATASET}*.json")):
        if path.stem in ARCHIVED:
            continue
        data = load_json(path)
        if not data or not data.get("rows"):
            continue
        rows = [r | {"method": MULTI_DATASET_NAMES.get(r["method"], r["method"])} for r in data["rows"]]
        title = f"MNIST + Fashion-MNIST ({data['arch']}×{data['width']:g})" + (
            ", converged" if path.stem.endswith("_converged") else ""
        )
        tasks = [list(range(10)), list(range(10, 20))]
        facts = {k: data.get(k) for k in ("source_training", "sources")}
        out.append((title, {"rows": rows, "tasks": tasks, **facts}))
    return out


#: README.md's generated block: report.py rewrites what lies between these two lines.
README_BEGIN = "<!-- headlines: written by benchmarks/report.py, do not edit by hand -->"
README_END = "<!-- /headlines -->"


def sources_label(data: dict[str, Any]) -> str:
    """How a table's sources were trained, from its JSON: 'converged' (every source met the plateau
    rule), 'to a plateau (k of n met the rule)', or 'N epoch(s)'."""
    training = data.get("source_training") or {}
    if training.get("plateau"):
        records = [r for group in (data.get("sources") or {}).values() for r in group]
        if not records:
            return "to a plateau (no training records)"
        met = sum(bool(r.get("plateau_met")) for r in records)
        return "converged" if met == len(records) else f"to a plateau ({met} of {len(records)} met the rule)"
    epochs = training.get("max_epochs", 1)
    return f"{epochs} epoch{'s' * (epochs != 1)}"


def _pick_cell(pick: dict[str, Any], first: bool) -> str:
    if not pick["method"]:
        return "–"
    budget = f"(≤ {pick['budget']:g}×) " if first and pick["budget"] != 1 else ""
    fraction = f"**{100 * pick['of_treated_ensemble']:.1f} %**" + (" (above it)" if pick["passes"] else "")
    return f"{budget}{pick['method']} at {pick['rel_flops']:.2f}×: {pick['joint']:.2f} = {fraction}"


def headline_table(entries: Sequence[tuple[str, dict[str, Any], Sequence[float]]]) -> list[str]:
    """One markdown row per table (heading, JSON data, FLOPs budgets) with an equally treated ensemble
    on every seed group: that ensemble's joint accuracy and the best merge per budget as a fraction of
    it (``merge_table.headline``, raw logits); the tables without one are named below the table."""
    lines = [
        "| table | sources | seed groups | treated ensemble (untreated) | best at ≤ 1× a source's FLOPs "
        "| best at ≤ 2× |",
        "|---|---|---|---|---|---|",
    ]
    missing = []
    for heading, data, budgets in entries:
        h = mt.headline(data["rows"], len(data["tasks"]), mt.HEADLINE_SCORING, budgets)
        if math.isnan(h["treated_ensemble"]):
            missing.append(heading)
            continue
        groups = len(dict.fromkeys(r["seeds"] for r in data["rows"]))
        ensemble = f"{h['treated_ensemble']:.2f} ({h['untreated_ensemble']:.2f})"
        picks = [_pick_cell(p, i == 0) for i, p in enumerate(h["picks"])]
        lines.append(f"| {heading} | {sources_label(data)} | {groups} | {ensemble} | {' | '.join(picks)} |")
    if missing:
        no_ensemble = "No equally treated ensemble on every seed group (reference rows missing: rerun it)"
        lines += ["", f"{no_ensemble}: {'; '.join(missing)}."]
    return lines


def headline_entries(
    results: Path, tables: Sequence[tuple[str, str, str]] = TABLES
) -> list[tuple[str, dict[str, Any], Sequence[float]]]:
    """The merge tables with rows (budgets 1× and 2×) and the MNIST + Fashion-MNIST tables (their own
    first budget, ``multi_dataset.BUDGETS``: every merge there keeps both heads)."""
    entries = []
    for heading, stem, _ in tables:
        data = load_json(results / f"{stem}.json")
        if data and data.get("rows"):
            entries.append((heading, data, mt.BUDGETS))
    return entries + [(title, data, md.BUDGETS) for title, data in multi_dataset_tables(results)]


def replace_block(text: str, block: Sequence[str], name: str) -> str:
    """``text`` with the lines between README_BEGIN and README_END replaced by ``block``."""
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        marks = f"{README_BEGIN!r} ... {README_END!r}"
        raise ValueError(f"{name} lacks the lines {marks} that mark where the headlines go")
    head = text[: begin + len(README_BEGIN)]
    return head + "\n" + "\n".join(block) + "\n" + text[end:]


def write_frontiers(results: Path, tables: Sequence[tuple[str, str, str]] = TABLES) -> list[Path]:
    """``frontier_<family>.png`` in ``results`` for every family with a table that has rows (and one
    for the MNIST + Fashion-MNIST tables)."""
    families: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for heading, stem, _ in tables:
        data = load_json(results / f"{stem}.json")
        if data and data.get("rows"):
            families.setdefault(family(stem), []).append((heading, data))
    if multi := multi_dataset_tables(results):
        families[MULTI_DATASET] = multi
    written = [frontier.plot_family(t, results / f"frontier_{f}.png") for f, t in families.items()]
    return [p for p in written if p is not None]


def frontier_images(results: Path, out_dir: Path, tables: Sequence[tuple[str, str, str]]) -> list[str]:
    """Links to the families' frontier PNGs that exist (written by :func:`write_frontiers`)."""
    lines = []
    for name in dict.fromkeys([*(family(stem) for _, stem, _ in tables), MULTI_DATASET]):
        png = results / f"frontier_{name}.png"
        if png.is_file():
            link = Path(os.path.relpath(png, out_dir)).as_posix()
            lines += [f"![{name}: joint accuracy vs relative FLOPs]({link})", ""]
    return lines


def machine_lines(machines: Sequence[str]) -> list[str]:
    """One line for one machine, else a list: the tables record theirs (load average included)."""
    if len(machines) <= 1:
        return ["Machine: " + (machines[0] if machines else "no results yet")]
    return ["Machines, as the tables record them:", "", *(f"- {m}" for m in machines)]


def _section(heading: str, results: Path, stem: str, command: str) -> list[str]:
    md = results / f"{stem}.md"
    body = demote(md.read_text()) if md.is_file() else not_run(command) + "\n"
    return [f"## {heading}", "", body]


def _sweep_images(results: Path, stem: str, out_dir: Path) -> list[str]:
    name = stem.removeprefix("sweep_")
    lines = []
    for kind, what in (("pleas_width", "merged width"), ("zip_depth", "partial-zip depth")):
        png = results / f"sweep_{kind}_{name}.png"
        if png.is_file():
            lines += [f"![joint accuracy vs {what}]({Path(os.path.relpath(png, out_dir)).as_posix()})", ""]
    return lines


def archive_sections(results: Path, archive: Sequence[tuple[str, str]] = ARCHIVE) -> list[str]:
    """The archived tables that exist, under one heading that says why they are not compared."""
    found = [(h, results / f"{stem}.md") for h, stem in archive]
    found = [(h, path) for h, path in found if path.is_file()]
    if not found:
        return []
    lines = [
        "## Earlier runs, for the record",
        "",
        "Sources trained briefly, not to the plateau rule (one epoch; three for the ViT; a few "
        "hundred batches for the same-base MLPs), or, in the first ViT plateau run, under a 15-epoch "
        "cosine cap that left two of six sources short of the rule; the oldest tables (ResNet-20×4, "
        "both VGG-11 widths, the first three-model table) also predate the equally treated references"
        " and the training records. They are left out of the summary and the frontiers; converged "
        "tables above replace all but the ResNet-20×4 and full-width VGG-11 ones. The one-epoch "
        "ResNet-20×1 table also holds rows the converged ones lack: PLeaS w=1.25, the partial zip "
        "@0.6, ZipIt! and MuDSC without the sources' reset, ZipIt! w=1.5, aligned RegMean and MaTS.",
        "",
    ]
    for heading, path in found:
        lines += [f"### {heading}", "", demote(path.read_text(), 3)]
    return lines


def extra_files(results: Path, prefixes: Sequence[str] = EXTRA_PREFIXES) -> list[Path]:
    """The other scripts' notes, by ``prefixes`` order (sorted by name within a prefix), not archived."""
    found = [p for prefix in prefixes for p in sorted(results.glob(f"{prefix}*.md"))]
    return [p for p in found if p.stem not in ARCHIVED]


def _notes(results: Path, prefixes: Sequence[str]) -> list[str]:
    lines = []
    for path in extra_files(results, prefixes):
        lines += [f"## {path.stem}", "", demote(path.read_text())]
    return lines


def build_report(
    results: Path,
    out_dir: Path,
    tables: Sequence[tuple[str, str, str]] = TABLES,
    sweeps: Sequence[tuple[str, str, str]] = SWEEPS,
    archive: Sequence[tuple[str, str]] = ARCHIVE,
    headlines: Sequence[str] | None = None,
) -> str:
    """BENCHMARKS.md's text from ``results`` (image links relative to ``out_dir``); ``headlines`` is
    the summary's headline table when the caller has built it already (README's block is the same)."""
    if headlines is None:
        headlines = headline_table(headline_entries(results, tables))
    data = {stem: load_json(results / f"{stem}.json") for _, stem, _ in (*tables, *sweeps)}
    machines = list(dict.fromkeys(d["machine"] for d in data.values() if d))
    lines = [
        "# Benchmarks",
        "",
        "Generated by `.venv/bin/python benchmarks/report.py` from the files in `benchmarks/results/`; "
        "every number comes from the command listed with its table. Fashion-MNIST, sources trained "
        "from different seeds on disjoint class splits (`artifacts/sources`; one epoch, or to a "
        "validation plateau in the tables marked converged, each table lists its sources' epochs and "
        "curves), merged without training. Each headline takes the best merge at ≤ 1× and at ≤ 2× a "
        "source's FLOPs (nonzero weights, every row counted alike) and divides its joint accuracy by "
        "the equally treated ensemble's (its sources given the merge's BatchNorm reset); a merge is "
        "said to be above the ensemble only when it is so at no more than the ensemble's FLOPs. "
        "Joint accuracy (argmax over all classes) scores a merge that has collapsed "
        "onto one task at about half that task's accuracy, because no source's logits for the classes "
        "it never saw were trained against the others'; so the merges are compared with weight "
        "averaging on the per-task average as well.",
        "",
        *machine_lines(machines),
        "",
        "## Summary",
        "",
        "Joint accuracy (%, raw logits, mean over the seed groups) of the equally treated ensemble, and "
        "the best merge per FLOPs budget with its fraction of that ensemble:",
        "",
        *headlines,
        "",
    ]
    for heading, stem, command in tables:
        lines += (
            table_summary(heading, data[stem]) if data[stem] else [f"- **{heading}**: {not_run(command)}"]
        )
    for heading, stem, command in sweeps:
        got = data[stem]
        regen = [f"  - regenerate: `{c}`" for c in got.get("commands", [got["command"]])] if got else []
        lines += [f"- **{heading}**" + ("" if got else f": {not_run(command)}"), *regen]
    lines.append("")
    images = frontier_images(results, out_dir, tables)
    if images:
        lines += ["## Cost/quality frontiers", "", *images]
    for heading, stem, command in tables:
        lines += _section(heading, results, stem, command)
    for heading, stem, command in sweeps:
        lines += _section(heading, results, stem, command) + _sweep_images(results, stem, out_dir)
    lines += _notes(results, RESULT_PREFIXES)
    lines += archive_sections(results, archive)
    lines += _notes(results, EXTRA_PREFIXES[len(RESULT_PREFIXES) :])
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", default="benchmarks/results", help="where the scripts wrote their files")
    p.add_argument("--out", default="BENCHMARKS.md", help="the markdown file to write")
    p.add_argument("--readme", default="README.md", help="its headlines block is rewritten ('': none)")
    args = p.parse_args(argv)
    results, out = Path(args.results_dir), Path(args.out)
    if not results.is_dir():
        p.error(f"--results-dir {results} is not a directory")
    for png in write_frontiers(results):
        print(f"wrote {png}")
    block = headline_table(headline_entries(results))
    text = build_report(results, out.parent, headlines=block)
    out.write_text(text)
    print(f"wrote {out} ({len(text.splitlines())} lines)")
    if args.readme:
        readme = Path(args.readme)
        readme.write_text(replace_block(readme.read_text(), block, str(readme)))
        print(f"rewrote the headlines in {readme}")
    return text


if __name__ == "__main__":
    main()
