"""MNIST + Fashion-MNIST merged into one 20-class model (ZipIt!'s multi-data-set setting): the results table.

    .venv/bin/python benchmarks/multi_dataset.py --seeds 0:1 2:3 4:5

A seed group ``a:b`` trains the MNIST model with seed ``a`` and the Fashion-MNIST model with seed ``b``
(``examples/merge_mnist_fmnist.py``'s settings and cache, so seed group 0:1 is the example's pair). Each
data set is its own task and label space (``DatasetTasks``): digits are global classes 0-9, clothes 10-19.
Every model keeps one linear head per source (linear heads over different classes cannot share columns),
so every merge is cut at the heads' input (``stop_at=1.0``, "full": the whole network but the heads) or
earlier (ZipIt! partial). Rows: both sources, the ensemble untreated and given the merges' treatment
(``ensemble (reset)``), and the merges. Resumable: rows already in the JSON for the same seed group and
method settings are kept (``--fresh`` ignores them).
``--converged`` trains the sources until their validation accuracy plateaus (``merge_table.py``'s rule
and schedule) and writes ``..._converged``; each group's epochs and validation curves go into the JSON.
Writes ``benchmarks/results/multi_dataset_mnist_fmnist_<arch>x<w>[_converged].{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import command_line, machine_description  # noqa: E402
from merge_table import (  # noqa: E402
    SourceTraining,
    converged_training,
    headline_lines,
    parse_seeds,
    seeds_label,
    sources_lines,
    stats_file,
    stem_file,
    training_facts,
)

from lightning_merge.cost import count_flops, count_params
from lightning_merge.data import DatasetTasks, MergeDataModule, TaskData, TaskSplitDataModule
from lightning_merge.methods import (
    AverageMerge,
    MergeMethod,
    MuDSCMerge,
    PermuteMerge,
    PLeaSMerge,
    ZipItMerge,
    method_config,
)
from lightning_merge.models import train_source
from lightning_merge.models.training import cache_path, quiet_lightning, source_key
from lightning_merge.module import MergeModule

DATASETS = (("mnist", "MNIST", list(range(10))), ("fashion_mnist", "Fashion-MNIST", list(range(10, 20))))
IMAGE = (1, 28, 28)
ZIP = {"alpha": 0.3, "beta": 0.125}
#: rows that evaluate references, then the merge rows (label, factory)
REFERENCES = {"MNIST model": "source0", "Fashion-MNIST model": "source1", "ensemble": "ensemble"}
REFERENCES["ensemble (reset)"] = "ensemble_reset"
Row = dict[str, Any]


def method_rows(stops: Sequence[float] = (0.3, 0.6)) -> list[tuple[str, Callable[[], MergeMethod]]]:
    """The merges in table order; every one keeps each source's head (cut at the heads' input or before)."""
    rows: list[tuple[str, Callable[[], MergeMethod]]] = [
        ("average", lambda: AverageMerge(stop_at=1.0)),
        ("permute", lambda: PermuteMerge(anchor="first", stop_at=1.0)),
        ("zipit", lambda: ZipItMerge(**ZIP, stop_at=1.0)),
    ]
    rows += [(f"zipit partial@{s:g}", lambda s=s: ZipItMerge(**ZIP, stop_at=s)) for s in stops]
    rows.append(("mudsc", lambda: MuDSCMerge(lam=0.5, matcher="zipit", **ZIP, stop_at=1.0)))
    rows += [(f"pleas w={w:g}", lambda w=w: PLeaSMerge(width=w, stop_at=1.0)) for w in (1.0, 1.5)]
    return rows


def source_training(converged: bool) -> SourceTraining:
    """The example's one-cycle epoch, or ``merge_table.py --converged``'s cap, rule and schedule."""
    return converged_training() if converged else SourceTraining(schedule="onecycle")


def source_settings(width: float, converged: bool) -> dict[str, Any]:
    """``train_source``'s keyword arguments for one source (:func:`source_training`; max_epochs 1 and no
    plateau rule are ``train_source``'s defaults, so the example's cache key is unchanged)."""
    t = source_training(converged)
    settings = {"head": "linear", "lr": 0.05, "weight_decay": 5e-4, "schedule": t.schedule}
    settings |= {"max_epochs": t.max_epochs, "plateau": t.plateau}
    return settings | ({"width": width} if width != 1 else {})  # width 1 keeps the example's cache key


def sources(
    seeds: Sequence[int], arch: str, width: float, cache_dir: str, converged: bool = False
) -> list[nn.Module]:
    """The group's two networks (trained into ``cache_dir`` when absent), as plain modules."""
    settings = source_settings(width, converged)
    return [
        train_source(arch, range(10), seed, dataset=name, cache_dir=cache_dir, **settings).model
        for seed, (name, _, _) in zip(seeds, DATASETS, strict=True)
    ]


def source_records(
    seeds: Sequence[int], arch: str, width: float, cache_dir: str, converged: bool
) -> list[dict]:
    """Per source: its checkpoint and the training facts its cache record holds (epochs, curve, plateau)."""
    settings = source_settings(width, converged)
    out = []
    for seed, (name, _, _) in zip(seeds, DATASETS, strict=True):
        path = cache_path(cache_dir, source_key(arch, range(10), seed, dataset=name, **settings))
        facts = training_facts(path)
        out.append({"checkpoint": path.name, "dataset": name, "max_epochs": settings["max_epochs"], **facts})
    return out


def tasks(calibration_size: int) -> DatasetTasks:
    """Each data set one task (its test split scored, its training split calibrating)."""
    return DatasetTasks(
        [
            TaskData(
                classes=classes,
                name=name,
                datamodule=TaskSplitDataModule(dataset=name, tasks=[list(range(10))], task=0),
            )
            for name, _, classes in DATASETS
        ],
        calibration_size=calibration_size,
        batch_size=500,
    )


def run_merge(
    method: MergeMethod, nets: Sequence[nn.Module], data: DatasetTasks, stats: str, references: bool
) -> tuple[dict[str, float], float, float]:
    """One ``MergeModule`` validation: its results, relative nonzero parameters and FLOPs."""
    pl.seed_everything(0, verbose=False)
    module = MergeModule(
        sources=list(nets),
        method=method,
        stats_path=stats,
        evaluate_sources=references,
        evaluate_ensemble=references,
        heatmaps=0,
    )
    with quiet_lightning(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
        )
        trainer.validate(module, datamodule=MergeDataModule(data), verbose=False)
    one = nets[0]
    rel_params = count_params(module.merged) / count_params(one)
    rel_flops = count_flops(module.merged, IMAGE) / count_flops(one, IMAGE)
    return dict(module.results), rel_params, rel_flops


def to_row(seeds: str, label: str, results: dict[str, float], key: str, rel: tuple[float, float]) -> Row:
    """Accuracies (%) of ``key``'s model: joint over 20 classes and within each data set (a source has
    none on the other data set: ``None``)."""
    got = [results.get(f"{key}/{m}") for m in ("joint_acc", "task0_acc", "task1_acc")]
    acc = [None if a is None else 100 * a for a in got]
    return {
        "seeds": seeds,
        "method": label,
        "joint_acc": acc[0],
        "mnist_acc": acc[1],
        "fmnist_acc": acc[2],
        "avg_acc": None if None in acc else (acc[1] + acc[2]) / 2,
        "rel_params": rel[0],
        "rel_flops": rel[1],
    }


def run_group(
    seeds: Sequence[int], args: argparse.Namespace, store: list[Row], save: Callable[[], None]
) -> None:
    """Every merge row of one seed group (the references with the first merge run), reusing stored rows."""
    group = seeds_label(seeds)
    nets: list[nn.Module] = []
    data = tasks(args.calibration_size)
    for label, factory in method_rows(args.stops):
        method = factory()
        config = json.loads(json.dumps(method_config(method), default=str))
        have = {(r["seeds"], r["method"]) for r in store}
        refs = not all((group, r) in have for r in REFERENCES)
        if not refs and any(
            r["seeds"] == group and r["method"] == label and r["config"] == config for r in store
        ):
            print(f"seeds {group} {label:>20}: reused")
            continue
        nets = nets or sources(seeds, args.arch, args.width, args.cache_dir, args.converged)
        start = time.perf_counter()
        stats = stats_file(Path(args.stats_dir), "mnist_fmnist", seeds, method, args.calibration_size)
        results, rel_params, rel_flops = run_merge(method, nets, data, stats, refs)
        row = to_row(group, label, results, "merged", (rel_params, rel_flops))
        new = [row | {"config": config, "seconds": time.perf_counter() - start}]
        if refs:
            sizes = [(1.0, 1.0), (1.0, 1.0), (2.0, 2.0), (2.0, 2.0)]
            new = [
                to_row(group, n, results, k, s) for (n, k), s in zip(REFERENCES.items(), sizes, strict=True)
            ] + new
        store[:] = [
            r for r in store if (r["seeds"], r["method"]) not in {(n["seeds"], n["method"]) for n in new}
        ]
        store += new
        print(f"seeds {group} {label:>20}: joint {row['joint_acc']:.2f}%  ({new[-1]['seconds']:.0f} s)")
        save()


def mean_std(values: Sequence[float | None]) -> str:
    """``mean ± std`` over seed groups; "–" where a model has no such number (a source, other data set)."""
    if any(v is None for v in values):
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:.2f}" if len(values) < 2 else f"{mean:.2f} ± {statistics.stdev(values):.2f}"


def markdown(meta: dict[str, Any]) -> str:
    """Mean ± std over seed groups of every column, the row settings, the command and the machine."""
    rows = meta["rows"]
    groups = list(dict.fromkeys(r["seeds"] for r in rows))
    order = [*REFERENCES, *(label for label, _ in method_rows(meta["stops"]))]
    no_batchnorm = "; an MLP has no BatchNorm, so it equals the ensemble" if meta["arch"] == "mlp" else ""
    lines = [
        f"# MNIST + Fashion-MNIST → one 20-class model ({meta['arch']}×{meta['width']:g})",
        "",
        f"Seed groups (MNIST seed : Fashion-MNIST seed): {', '.join(groups)}; "
        + ("mean ± std over seed groups." if len(groups) > 1 else "one seed group, so no std."),
        "Accuracies in % on both test sets (20,000 images). joint: argmax over all 20 classes (digits "
        "0–9, clothes 10–19) of the two heads' logits side by side; MNIST / Fashion-MNIST: argmax within "
        "that data set's 10 classes on its own images. Every merge keeps one linear head per source (cut at "
        "the heads' input, or earlier for a partial zip). Relative params / FLOPs: nonzero weights, against "
        "one source (FLOPs of one 28×28 image); the ensemble's are 2. `ensemble (reset)`: the ensemble "
        "given the merges' post-merge treatment (BatchNorm reset)" + no_batchnorm + ".",
        "",
        "| method | joint | MNIST | Fashion-MNIST | avg | rel. params | rel. FLOPs | s / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in [m for m in order if any(r["method"] == m for r in rows)]:
        sel = [r for r in rows if r["method"] == label]
        cells = [mean_std([r[c] for r in sel]) for c in ("joint_acc", "mnist_acc", "fmnist_acc", "avg_acc")]
        cells += [mean_std([r[c] for r in sel]) for c in ("rel_params", "rel_flops")]
        cells.append(f"{statistics.fmean(r['seconds'] for r in sel):.0f}" if "seconds" in sel[0] else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", *headline(rows), "", *sources_lines(meta), "", "Row settings:", ""]
    for label in order:
        config = next((r["config"] for r in rows if r["method"] == label and r.get("config")), None)
        if config:
            args = ", ".join(f"{k}={v}" for k, v in config.get("init_args", {}).items())
            lines.append(f"- {label}: `{config['name']}({args})`")
    lines += ["", "Commands:", "", "```", *meta["commands"], "```", "", f"Machine: {meta['machine']}", ""]
    return "\n".join(lines)


#: FLOPs budgets of the headline: every merge here keeps two heads, so "one network" is one trunk with
#: two 10-class heads, a little over one source (1.01× for mlp×1); the budget allows 2 % for them.
BUDGETS = (1.02, 2.0)


def headline(rows: Sequence[Row]) -> list[str]:
    """``merge_table``'s headline (best merge per FLOPs budget against the equally treated ensemble) over
    the merges and the two ensembles (the sources are not candidates)."""
    sources = {label for label, key in REFERENCES.items() if key.startswith("source")}
    lines = headline_lines([r for r in rows if r["method"] not in sources], num_tasks=2, budgets=BUDGETS)
    note = f"The first budget is {BUDGETS[0]:g}×, not 1×: every merge keeps both sources' heads."
    return [*lines, note]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="mlp", help="source architecture (registry name)")
    p.add_argument("--width", type=float, default=1, help="source width multiplier")
    p.add_argument("--seeds", type=parse_seeds, nargs="+", default=[(0, 1)], help="MNIST:FMNIST seed groups")
    p.add_argument("--stops", type=float, nargs="+", default=[0.3, 0.6], help="partial-zip depths")
    p.add_argument("--calibration-size", type=int, default=2000, help="images in the statistics pass")
    p.add_argument("--cache-dir", default="artifacts/mnist_fmnist/sources", help="source checkpoints")
    p.add_argument("--stats-dir", default="artifacts/mnist_fmnist/stats", help="statistics files")
    p.add_argument("--out-dir", default="benchmarks/results", help="where the json / md go")
    p.add_argument("--fresh", action="store_true", help="ignore rows already in the output JSON")
    p.add_argument("--converged", action="store_true", help="train the sources to a validation plateau")
    return p


def main(argv: list[str] | None = None) -> list[Row]:
    args = parser().parse_args(argv)
    bad = [seeds_label(s) for s in args.seeds if len(s) != 2]
    if bad:
        parser().error(f"a seed group is MNIST_SEED:FMNIST_SEED, got {bad}")
    logging.getLogger("lightning_merge").setLevel(logging.WARNING)
    suffix = "_converged" if args.converged else ""
    out = Path(args.out_dir) / f"multi_dataset_mnist_fmnist_{args.arch}x{args.width:g}{suffix}"
    Path(args.stats_dir).mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(stem_file(out, ".json").read_text()) if stem_file(out, ".json").is_file() else {}
    command = command_line("benchmarks/multi_dataset.py", argv)
    meta = {
        "arch": args.arch,
        "width": args.width,
        "stops": args.stops,
        "machine": machine_description(),
        "commands": [c for c in old.get("commands", []) if c != command] + [command],
        "rows": [] if args.fresh else old.get("rows", []),
        "source_training": source_training(args.converged).as_dict(),
        "sources": {} if args.fresh else old.get("sources", {}),
    }

    def save() -> None:
        stem_file(out, ".json").write_text(json.dumps(meta, indent=2))
        stem_file(out, ".md").write_text(markdown(meta))

    for seeds in args.seeds:
        run_group(seeds, args, meta["rows"], save)
        records = source_records(seeds, args.arch, args.width, args.cache_dir, args.converged)
        meta["sources"][seeds_label(seeds)] = records
    save()
    print(f"wrote {out}.{{json,md}}")
    return meta["rows"]


if __name__ == "__main__":
    main()
