"""The ZipIt!-style results table on Fashion-MNIST 5+5: every merge method on pairs of source models.

    .venv/bin/python benchmarks/merge_table.py --arch resnet20 --width 1 --pairs 0:1 [2:3 ...]

A pair ``a:b`` is task [0..4] trained with seed a and task [5..9] with seed b, with the settings of
the default pair (``lightning_merge.models.sources.DEFAULT_PAIR``) and its cache ``artifacts/sources``,
so seeds 0:1 at ResNet-20×1 load instead of training. Each row is one ``MergeModule`` validation run
through the Python API; the statistics pass runs once per pair (one ``stats_path`` file per pair).
Writes ``merge_table_<arch>x<w>.{csv,json,md}`` (raw per-pair rows, and mean ± std over pairs).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_merge.callbacks.statistics import MergeStatistics
from lightning_merge.data import TaskSplitDataModule
from lightning_merge.data.datamodule import DEFAULT_ROOT
from lightning_merge.methods import get_method
from lightning_merge.methods.base import MergeMethod
from lightning_merge.models import SourceClassifier
from lightning_merge.models.sources import DEFAULT_CACHE_DIR, DEFAULT_PAIR, SourceSpec, train_spec
from lightning_merge.models.training import quiet_lightning
from lightning_merge.module import MergeModule

COLUMNS = (
    "pair",
    "method",
    "joint_acc",
    "task_a_acc",
    "task_b_acc",
    "avg_task_acc",
    "rel_params",
    "rel_flops",
    "seconds",
    "stats",
)
ACCURACY_COLUMNS = ("joint_acc", "task_a_acc", "task_b_acc", "avg_task_acc")
ZIP = {"alpha": 0.3, "beta": 0.125}

#: (row label, method factory); the arguments are those of configs/merge/*_fmnist_resnet20x1.yaml.
MethodRow = tuple[str, Callable[[], MergeMethod]]


def method_rows(with_pleas: bool = False, stops: Sequence[float] = (0.3, 0.6)) -> list[MethodRow]:
    """The table's merge rows in order (PLeaS only on request: minutes per ResNet merge on a CPU)."""
    rows: list[MethodRow] = [
        ("average", lambda: get_method("average")),
        ("weight_matching", lambda: get_method("weight_matching", max_iter=100, seed=0)),
        ("permute", lambda: get_method("permute", anchor="first")),
        ("zipit", lambda: get_method("zipit", **ZIP)),
    ]
    rows += [(f"zipit partial@{s:g}", _factory("zipit", **ZIP, stop_at=s)) for s in stops]
    rows.append(("mudsc", lambda: get_method("mudsc", lam=0.5, matcher="zipit", **ZIP)))
    if with_pleas:
        rows += [
            (f"pleas w={w:g}", _factory("pleas", width=w, ridge=1e-4, refit=True)) for w in (1.0, 1.5, 2.0)
        ]
    rows.append(("zipit w=1.5", _factory("zipit", **ZIP, width=1.5)))
    return rows


def _factory(name: str, **kwargs: Any) -> Callable[[], MergeMethod]:
    return lambda: get_method(name, **kwargs)


def parse_pair(text: str) -> tuple[int, int]:
    """``"0:1"`` → ``(0, 1)``: the seeds of the task-A and task-B source models."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().lstrip("-").isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"a pair is SEED_A:SEED_B (e.g. 0:1), got {text!r}")
    return int(parts[0]), int(parts[1])


def pair_sources(
    seeds: tuple[int, int], arch: str, width: float, cache_dir: str | Path, root: str = DEFAULT_ROOT
) -> list[SourceClassifier]:
    """The pair's two source models, trained like ``DEFAULT_PAIR`` (loaded when cached)."""
    specs: list[SourceSpec] = [
        replace(spec, seed=seed, arch=arch, width=width)
        for spec, seed in zip(DEFAULT_PAIR, seeds, strict=True)
    ]
    return [train_spec(s, cache_dir, root) for s in specs]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, image_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass on a single image (matmuls/convolutions, as torch counts them)."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, *image_shape))
    model.train(was_training)
    return counter.get_total_flops()


def _row(
    pair: str, label: str, acc: dict[str, float], params: float, flops: float, seconds: float, stats: str
) -> dict:
    a, b = 100 * acc["task0_acc"], 100 * acc["task1_acc"]
    return {
        "pair": pair,
        "method": label,
        "joint_acc": 100 * acc["joint_acc"],
        "task_a_acc": a,
        "task_b_acc": b,
        "avg_task_acc": (a + b) / 2,
        "rel_params": params,
        "rel_flops": flops,
        "seconds": seconds,
        "stats": stats,
    }


def _metrics(results: dict[str, float], model: str) -> dict[str, float]:
    return {k.split("/", 1)[1]: v for k, v in results.items() if k.startswith(f"{model}/")}


def evaluate_merge(
    label: str,
    method: MergeMethod,
    sources: Sequence[nn.Module],
    datamodule: TaskSplitDataModule,
    *,
    pair: str = "0:1",
    stats_path: str | None = None,
    references: bool = False,
) -> tuple[list[dict], MergeModule]:
    """One merge run → its table row (and, with ``references``, the model A / B / ensemble rows).

    Relative parameters and FLOPs are against one source (a partial zip counts trunk + N tails);
    ``seconds`` is the whole run (statistics pass or cache load, merge, test-set evaluation, counts);
    ``stats`` says whether the statistics came from a ``"pass"``, the ``"cache"`` file or ``"none"``.
    """
    if len(sources) != 2:
        raise ValueError(f"the table compares pairs of sources, got {len(sources)} sources")
    start = time.perf_counter()
    pl.seed_everything(0, verbose=False)
    module = MergeModule(
        sources=list(sources),
        method=method,
        stats_path=stats_path,
        evaluate_sources=references,
        evaluate_ensemble=references,
        heatmaps=0,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    with quiet_lightning(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.validate(module, datamodule=datamodule, verbose=False)
    shape = datamodule.image_shape
    one = module.sources[0]
    params, flops = count_params(one), count_flops(one, shape)
    rel_params, rel_flops = count_params(module.merged) / params, count_flops(module.merged, shape) / flops
    seconds = time.perf_counter() - start
    stats = next((c.source for c in trainer.callbacks if isinstance(c, MergeStatistics)), None) or "none"
    acc = _metrics(module.results, "merged")
    rows = [_row(pair, label, acc, rel_params, rel_flops, seconds, stats)]
    if references:
        refs = [("model A", "source0", 1.0), ("model B", "source1", 1.0), ("ensemble", "ensemble", 2.0)]
        rows = [_row(pair, n, _metrics(module.results, k), r, r, 0.0, "none") for n, k, r in refs] + rows
    return rows, module


def run_pair(
    seeds: tuple[int, int],
    rows: Sequence[MethodRow],
    datamodule: TaskSplitDataModule,
    arch: str,
    width: float,
    cache_dir: str | Path,
    stats_dir: Path,
    echo: Callable[[str], None] = print,
) -> list[dict]:
    """Every row for one pair of seeds; the sources and the ensemble are scored in the first run."""
    pair = f"{seeds[0]}:{seeds[1]}"
    sources = pair_sources(seeds, arch, width, cache_dir, datamodule.root)
    stats_path = str(stats_dir / f"{arch}x{width:g}_s{seeds[0]}-{seeds[1]}_moments.safetensors")
    out: list[dict] = []
    for i, (label, factory) in enumerate(rows):
        got, _ = evaluate_merge(
            label, factory(), sources, datamodule, pair=pair, stats_path=stats_path, references=i == 0
        )
        for r in got:
            echo(f"pair {pair} {r['method']:>20}: joint {r['joint_acc']:.2f}%  ({r['seconds']:.0f} s)")
        out += got
    return out


def write_csv(rows: Sequence[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})


def _mean_std(values: Sequence[float], digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summary_markdown(rows: Sequence[dict], command: str, machine: str, title: str) -> str:
    """Mean ± std over pairs of every column, the command that made it and the machine."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    pairs = sorted({r["pair"] for r in rows})
    lines = [
        f"# {title}",
        "",
        f"Pairs of seeds (task [0..4] : task [5..9]): {', '.join(pairs)}; "
        + ("mean ± std over pairs." if len(pairs) > 1 else "one pair, so no std."),
        "Accuracies in % on the Fashion-MNIST test set; relative params / FLOPs against one source "
        "(FLOPs: torch.utils.flop_counter on one 28×28 image; a partial zip counts trunk + 2 tails; "
        "the ensemble's are 2 by definition). s / run: one MergeModule validation (statistics pass "
        "when the pair has none yet, merge, REPAIR, 10k test images; the first run also scores the "
        "sources and the ensemble).",
        "",
        "| method | joint | task A | task B | avg | rel. params | rel. FLOPs | s / run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        sel = [r for r in rows if r["method"] == m]
        cells = [_mean_std([r[c] for r in sel], 2) for c in ACCURACY_COLUMNS]
        cells += [_mean_std([r[c] for r in sel], 2) for c in ("rel_params", "rel_flops")]
        cells.append(
            "–"
            if m in ("model A", "model B", "ensemble")
            else f"{statistics.fmean(r['seconds'] for r in sel):.0f}"
        )
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    best = max(
        (m for m in methods if m not in ("model A", "model B", "ensemble")),
        default=None,
        key=lambda m: statistics.fmean(r["joint_acc"] for r in rows if r["method"] == m),
    )
    ens = [r["joint_acc"] for r in rows if r["method"] == "ensemble"]
    if best is not None and ens:
        ratio = statistics.fmean(r["joint_acc"] for r in rows if r["method"] == best) / statistics.fmean(ens)
        lines += ["", f"Best merge by joint accuracy: **{best}**, {100 * ratio:.1f}% of the ensemble's."]
    lines += ["", "Command:", "", "```", command, "```", "", f"Machine: {machine}", ""]
    return "\n".join(lines)


def machine_description() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU run)"
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"{device}; Python {platform.python_version()}, torch {torch.__version__}, lightning {pl.__version__}"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="resnet20", help="source architecture (registry name)")
    parser.add_argument("--width", type=float, default=1, help="source width multiplier")
    parser.add_argument("--pairs", type=parse_pair, nargs="+", default=[(0, 1)], help="SEED_A:SEED_B ...")
    parser.add_argument("--with-pleas", action="store_true", help="add PLeaS at widths 1, 1.5, 2")
    parser.add_argument("--stops", type=float, nargs="+", default=[0.3, 0.6], help="partial-zip depths")
    parser.add_argument(
        "--cache-dir", default=DEFAULT_CACHE_DIR, help="source checkpoints (trained if absent)"
    )
    parser.add_argument(
        "--stats-dir", default="artifacts/merge_table/stats", help="per-pair statistics files"
    )
    parser.add_argument("--out-dir", default="benchmarks/results", help="where the csv / json / md go")
    parser.add_argument("--root", default=DEFAULT_ROOT, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--calibration-size", type=int, default=2000, help="images in the statistics pass")
    args = parser.parse_args(argv)
    logging.getLogger("lightning_merge").setLevel(logging.WARNING)
    data = TaskSplitDataModule(
        root=args.root,
        tasks=[list(s.classes) for s in DEFAULT_PAIR],
        eval_batch_size=500,
        calibration_size=args.calibration_size,
        calibration_seed=0,
    )
    stats_dir, out_dir = Path(args.stats_dir), Path(args.out_dir)
    stats_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows_spec = method_rows(args.with_pleas, args.stops)
    start = time.perf_counter()
    rows: list[dict] = []
    for seeds in args.pairs:
        rows += run_pair(seeds, rows_spec, data, args.arch, args.width, args.cache_dir, stats_dir)
    total = time.perf_counter() - start
    stem = out_dir / f"merge_table_{args.arch}x{args.width:g}"
    command = " ".join(
        [".venv/bin/python benchmarks/merge_table.py", *(argv if argv is not None else sys.argv[1:])]
    )
    machine = machine_description()
    write_csv(rows, stem.with_suffix(".csv"))
    meta = {"command": command, "machine": machine, "total_seconds": total, "rows": rows}
    stem.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    title = f"Merging {args.arch}×{args.width:g} pairs on Fashion-MNIST 5+5 ({total / 60:.1f} min in all)"
    stem.with_suffix(".md").write_text(summary_markdown(rows, command, machine, title))
    print(f"wrote {stem}.{{csv,json,md}} in {total:.0f} s")
    return rows


if __name__ == "__main__":
    main()
