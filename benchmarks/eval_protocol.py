"""The papers' evaluation protocol on one pair of sources: every reference untreated and given the
merge's BatchNorm reset, under both scoring rules, plus how often ZipIt!'s float32 softmax saturates.

    python benchmarks/eval_protocol.py --sources A.ckpt B.ckpt --name default_pair

Writes ``benchmarks/results/eval_protocol_<name>.{json,md}`` with the command and the machine. The
merge itself is a plain weight average (the references do not depend on the method).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import Column, command_line, machine_description, markdown_table  # noqa: E402

from lightning_merge.data import MergeDataModule, TaskSplitDataModule  # noqa: E402
from lightning_merge.evaluation import cosine_forward  # noqa: E402
from lightning_merge.methods import get_method  # noqa: E402
from lightning_merge.models.training import quiet_lightning  # noqa: E402
from lightning_merge.module import MergeModule  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RULES = ("logits", "per_head_softmax")


def run(sources: Sequence[str], scoring: str, calibration: int) -> tuple[dict[str, float], MergeModule]:
    """One validation run: accuracies of the merge and of every reference, untreated and treated."""
    module = MergeModule(
        list(sources), get_method("average"), treated_references="all", scoring=scoring, heatmaps=0
    )
    dm = MergeDataModule(TaskSplitDataModule(calibration_size=calibration, eval_batch_size=1000))
    with quiet_lightning():
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_model_summary=False, enable_progress_bar=False,
        )  # fmt: skip
        trainer.validate(module, datamodule=dm, verbose=False)
    return module.results, module


@torch.no_grad()
def float32_saturation(module: MergeModule, treated: bool) -> dict[str, float]:
    """ZipIt!'s rule as published (float32 softmax of cosine × 100 per head, first index wins a tie):
    its joint accuracy, and the share of test images where every head's top probability is 1.0."""
    models, heads = (module.treated if treated else module.sources), module.prepared.heads
    correct = saturated = total = 0
    for task in range(len(module.data.tasks)):
        for images, labels in module.data.task_data.task_test_dataloader(task):
            probs = []
            for model, head in zip(models, heads, strict=True):
                own = cosine_forward(model, images)[:, list(head.classes)].float()
                probs.append((head.classes, own.softmax(-1)))
            flat = torch.cat([p for _, p in probs], -1)
            classes = torch.tensor([c for cs, _ in probs for c in cs])
            correct += int((classes[flat.argmax(-1)] == labels).sum())
            saturated += int(torch.stack([p.amax(-1) == 1.0 for _, p in probs]).all(0).sum())
            total += len(labels)
    return {"float32_joint_acc": correct / total, "all_heads_saturated": saturated / total}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", nargs=2, required=True, help="two source checkpoints")
    parser.add_argument("--name", required=True, help="results file stem")
    parser.add_argument("--calibration", type=int, default=2000, help="calibration images (BatchNorm reset)")
    parser.add_argument(
        "--scorings", nargs="+", default=list(RULES), choices=RULES,
        help="rules to run; rows of other rules already in the results file are kept",
    )  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    record = {
        "command": command_line("benchmarks/eval_protocol.py", argv),
        "machine": machine_description("cpu"),
    }
    old = RESULTS / f"eval_protocol_{args.name}.json"
    kept = json.loads(old.read_text()) if old.exists() else {"rows": [], "zipit_float32_rule": {}}
    record |= {"rows": [r for r in kept["rows"] if r["scoring"] not in args.scorings]}
    record |= {
        "zipit_float32_rule": {} if "per_head_softmax" in args.scorings else kept["zipit_float32_rule"]
    }
    start = time.perf_counter()
    for scoring, tag in [(s, "phs_" if s == "per_head_softmax" else "") for s in args.scorings]:
        results, module = run(args.sources, scoring, args.calibration)
        for model in sorted({k.split("/")[0] for k in results}):
            row = {"scoring": scoring, "model": model}
            row |= {k.removeprefix(tag): 100 * results[f"{model}/{k}"] for k in _metrics(results, model)}
            record["rows"].append(row)
        if scoring == "per_head_softmax":
            record["zipit_float32_rule"] = {
                "untreated": float32_saturation(module, False),
                "reset": float32_saturation(module, True),
            }
        write(args.name, record | {"seconds": time.perf_counter() - start})  # partial results survive


def write(name: str, record: dict) -> None:
    """``eval_protocol_<name>.json`` and its Markdown table."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"eval_protocol_{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    cols = [Column("scoring", "scoring", ""), Column("model", "model", "")]
    cols += [Column(k, k.replace("_acc", " acc (%)"), ".2f") for k in ("joint_acc", "task0_acc", "task1_acc")]
    sat = "\n".join(
        f"- ensemble {k}: float32 rule joint acc {100 * v['float32_joint_acc']:.2f} %, every head at 1.0 "
        f"on {100 * v['all_heads_saturated']:.1f} % of test images"
        for k, v in record["zipit_float32_rule"].items()
    )
    table = markdown_table(cols, record["rows"])
    text = f"# Evaluation protocol: {name}\n\n`{record['command']}`\n\n{record['machine']}\n\n{table}\n"
    text += f"\nRun time {record['seconds']:.0f} s.\n\nZipIt!'s float32 rule as published:\n{sat}\n"
    (RESULTS / f"eval_protocol_{name}.md").write_text(text)
    print(text)


def _metrics(results: dict[str, float], model: str) -> list[str]:
    return [k.split("/", 1)[1] for k in results if k.startswith(f"{model}/")]


if __name__ == "__main__":
    main()
