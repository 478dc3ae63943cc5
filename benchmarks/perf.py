"""Performance of a merge: end-to-end stage times, statistics-pass memory, 1 vs 2 DDP processes.

    .venv/bin/python benchmarks/perf.py --sections e2e memory ddp --out benchmarks/results

* ``e2e``: the default pair (ResNet-20×1, ``lightning_merge.models.default_pair.default_pair()``) merged by
  ZipIt!, Permute and PLeaS (w = 1.5). Each stage is a direct call of the library function that
  ``MergeModule`` runs, timed on its own: graph trace, statistics pass (``collect_statistics``),
  matching (``method.match``), weight apply (``merge_state_dicts`` + ``build_merged_module``), PLeaS'
  least-squares refit (``method.refine``), BatchNorm reset (``reset_batchnorm``) and evaluation on
  the 10k test images (``evaluate_model``). A second, separate ``trainer.validate(MergeModule(...))``
  run of the same merge gives the whole-module time and must reach the same accuracy.
* ``memory``: peak extra memory of the statistics pass against the accumulator bound, for randomly
  initialised models, one fresh subprocess per measurement (CPU: peak RSS; CUDA: peak allocated).
* ``ddp``: ``trainer.validate(MergeModule(zipit))`` with 1 and 2 processes (``strategy="ddp"``, gloo on
  CPU), each in its own subprocess; rank 0 saves the merged weights, which are compared bitwise.

Each section writes ``perf_<section>.md`` and ``.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_io import Column, command_line, machine_description, markdown_table, write_results  # noqa: E402

from lightning_merge.apply.batchnorm_reset import reset_batchnorm  # noqa: E402
from lightning_merge.apply.module import build_merged_module  # noqa: E402
from lightning_merge.apply.weights import merge_state_dicts  # noqa: E402
from lightning_merge.data import MergeDataModule, TaskSplitDataModule  # noqa: E402
from lightning_merge.evaluation import SourceHead, evaluate_model  # noqa: E402
from lightning_merge.graph import trace_graph  # noqa: E402
from lightning_merge.graph.spec import MergeGraph  # noqa: E402
from lightning_merge.methods import MergeMethod, PermuteMerge, PLeaSMerge, ZipItMerge  # noqa: E402
from lightning_merge.methods.transform_base import TransformMethod, check_statistics_match  # noqa: E402
from lightning_merge.models.classifier import SourceClassifier  # noqa: E402
from lightning_merge.models.registry import build_model  # noqa: E402
from lightning_merge.module import MergeModule  # noqa: E402
from lightning_merge.stats.collect import collect_statistics  # noqa: E402
from lightning_merge.stats.moments import FeatureMomentsCollector, tapped_spaces  # noqa: E402

SCRIPT = Path(__file__).resolve()
SECTIONS = ("e2e", "memory", "ddp")
ZIP = {"alpha": 0.3, "beta": 0.125}
#: label → factory; the arguments of configs/merge/*_fmnist_resnet20x1.yaml (as benchmarks/merge_table.py)
METHODS: dict[str, Callable[[], MergeMethod]] = {
    "zipit": lambda: ZipItMerge(**ZIP),
    "permute": lambda: PermuteMerge(anchor="first"),
    "pleas": lambda: PLeaSMerge(width=1.5, ridge=1e-4, refit=True),
}
METHOD_LABELS = {"zipit": "zipit", "permute": "permute", "pleas": "pleas w=1.5"}
STAGES = ("trace", "collect", "match", "apply", "refit", "repair", "evaluate")
MIB = 2**20


# ================================================================== shared
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def stage(times: dict[str, float], name: str, device: torch.device) -> Iterator[None]:
    """Add the wall seconds of the block to ``times[name]`` (device work included)."""
    sync(device)
    start = time.perf_counter()
    yield
    sync(device)
    times[name] = times.get(name, 0.0) + time.perf_counter() - start


def networks(sources: Sequence[nn.Module]) -> list[nn.Module]:
    return [s.model if isinstance(s, SourceClassifier) else s for s in sources]


def heads_of(sources: Sequence[nn.Module]) -> list[SourceHead]:
    """How each source's logits map to global classes (as ``MergeModule`` scores them)."""
    heads = []
    for i, s in enumerate(sources):
        if not isinstance(s, SourceClassifier):
            raise TypeError(f"sources[{i}] is a {type(s).__name__}; perf needs SourceClassifier sources")
        heads.append(SourceHead(s.head_kind, tuple(s.classes), s.num_classes))
    return heads


def quiet_trainer(accelerator: str, devices: int = 1, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        **kwargs,
    )


def accelerator_of(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else device.type


def perf_datamodule(sources: Sequence[SourceClassifier], calibration_size: int = 2000) -> TaskSplitDataModule:
    """Fashion-MNIST split into the sources' tasks, as ``benchmarks/merge_table.py`` uses it."""
    tasks = [list(s.classes) for s in sources]
    dm = TaskSplitDataModule(tasks=tasks, eval_batch_size=500, calibration_size=calibration_size)
    dm.setup()
    return dm


# ================================================================== e2e
def staged_merge(
    method: MergeMethod,
    sources: Sequence[SourceClassifier],
    datamodule: TaskSplitDataModule,
    device: torch.device,
) -> dict[str, Any]:
    """One merge as ``MergeModule`` runs it, stage by stage: {stage: seconds, total_s, joint_acc}."""
    if not isinstance(method, TransformMethod):
        raise TypeError(f"stage timing needs a matching-based method, got {type(method).__name__}")
    models = [m.to(device).eval().requires_grad_(False) for m in networks(sources)]
    heads = heads_of(sources)
    calib = datamodule.calibration_dataloader()
    tests = [datamodule.task_test_dataloader(t) for t in range(len(datamodule.tasks))]
    times: dict[str, float] = {}
    sync(device)
    start = time.perf_counter()
    with torch.no_grad(), stage(times, "trace", device):
        graph = trace_graph(models[0], next(iter(calib))[0][:2].to(device))
    with stage(times, "collect", device):
        stats = collect_statistics(models, graph, calib, requires=sorted(method.requires), progress=False)
    with torch.no_grad():
        with stage(times, "match", device):
            method.check_stats(stats)
            check_statistics_match(stats, graph, len(models))
            transforms = method.match(models, graph, stats)
        with stage(times, "apply", device):
            state = merge_state_dicts([m.state_dict() for m in models], graph, transforms)
            merged = build_merged_module(models[0], state).to(device)
    if method.needs_data:
        with stage(times, "refit", device):
            method.refine(merged, models, graph, transforms, calib)  # in place
    with torch.no_grad(), stage(times, "repair", device):
        reset_batchnorm(merged, calib)
    with stage(times, "evaluate", device):
        acc = evaluate_model(merged, tests, datamodule.tasks, heads)
    sync(device)
    total = time.perf_counter() - start
    return {**{f"{k}_s": times.get(k) for k in STAGES}, "total_s": total, "joint_acc": 100 * acc["joint_acc"]}


def module_run(
    method: MergeMethod,
    sources: Sequence[SourceClassifier],
    datamodule: TaskSplitDataModule,
    device: torch.device,
) -> tuple[float, float]:
    """(seconds, joint accuracy %) of ``trainer.validate(MergeModule(...))`` scoring only the merge."""
    module = MergeModule(
        sources=list(sources), method=method, evaluate_sources=False, evaluate_ensemble=False, heatmaps=0
    )
    sync(device)
    start = time.perf_counter()
    with quiet():
        trainer = quiet_trainer(accelerator_of(device))
        trainer.validate(module, datamodule=MergeDataModule(datamodule), verbose=False)
    sync(device)
    return time.perf_counter() - start, 100 * module.results["merged/joint_acc"]


@contextmanager
def quiet() -> Iterator[None]:
    from lightning_merge.models.training import quiet_lightning

    with quiet_lightning(), warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        yield


def e2e_section(
    sources: Sequence[SourceClassifier],
    *,
    methods: Sequence[str] = tuple(METHODS),
    device: str | torch.device = "cpu",
    datamodule: TaskSplitDataModule | None = None,
    module_check: bool = True,
) -> list[dict[str, Any]]:
    """One row per method: stage seconds, their sum, the total, and the MergeModule cross-check."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise KeyError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    device = torch.device(device)
    dm = datamodule if datamodule is not None else perf_datamodule(sources)
    rows = []
    for name in methods:
        pl.seed_everything(0, verbose=False)
        row = {"method": METHOD_LABELS[name], "device": str(device)}
        row |= staged_merge(METHODS[name](), sources, dm, device)
        row["stages_sum_s"] = sum(row[f"{k}_s"] or 0.0 for k in STAGES)
        row["module_s"], row["module_joint_acc"] = None, None
        if module_check:
            pl.seed_everything(0, verbose=False)
            row["module_s"], row["module_joint_acc"] = module_run(METHODS[name](), sources, dm, device)
        rows.append(row)
    return rows


E2E_COLUMNS = [
    Column("method", "method"),
    Column("device", "device"),
    *[Column(f"{k}_s", f"{k} (s)", ".2f") for k in STAGES],
    Column("stages_sum_s", "Σ stages (s)", ".2f"),
    Column("total_s", "total (s)", ".2f"),
    Column("joint_acc", "joint acc %", ".2f"),
    Column("module_s", "MergeModule validate (s)", ".2f"),
    Column("module_joint_acc", "MergeModule joint acc %", ".2f"),
]
E2E_NOTES = (
    "Stages timed by calling the library functions MergeModule runs, one by one: trace = "
    "trace_graph on 2 calibration images; collect = collect_statistics (feature moments) over the "
    "{calib} calibration images; match = method.match; apply = merge_state_dicts + "
    "build_merged_module; refit = PLeaS' layer-wise least squares (method.refine; – for methods "
    "without one); repair = reset_batchnorm over the calibration images; evaluate = evaluate_model "
    "on the {test} test images of both tasks. total = wall time of the whole sequence (Σ stages "
    "plus the glue between them). MergeModule validate = a separate trainer.validate(MergeModule(...)) "
    "of the same merge with the sources and ensemble not scored (setup, graph trace, statistics pass, "
    "merge, BatchNorm reset, evaluation, Lightning's loop); its joint accuracy must equal the staged one."
)


# ================================================================== memory
def model_from_spec(spec: str) -> nn.Module:
    """``"resnet20x4"`` → ResNet-20 at width 4; ``"vgg11_bn"``; ``"mlpx0.25"`` (registry name[x width])."""
    match = re.fullmatch(r"(.+?)(?:x(\d+(?:\.\d+)?))?", spec)
    name, width = match.group(1), match.group(2)
    kwargs = {} if width is None else {"width": float(width)}
    return build_model(name, **kwargs)


def accumulator_bound_bytes(graph: MergeGraph, num_models: int) -> int:
    """Σ over observed merge points of (N·n)²·8 bytes: the float64 cross-product matrices."""
    return sum(8 * (num_models * graph.space(s).size) ** 2 for s in tapped_spaces(graph))


def _status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is no /proc."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return None if found is None else 1024 * int(found.group(1))


def _reset_peak_rss() -> bool:
    """Reset the peak-RSS mark to the current RSS (Linux ≥ 4.0: ``5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _largest_block_bytes(model: nn.Module, graph: MergeGraph, num_models: int, batch_size: int) -> int:
    """Bytes of the biggest transient per-batch float64 block (N·n × samples) the pass builds."""
    seen: dict[str, int] = {}
    hooks = []
    for tap in graph.taps:

        def hook(module: nn.Module, args: tuple, tap=tap) -> None:
            x = args[0]
            width = x.shape[tap.channel_dim if tap.kind == "input" else -1]
            seen[tap.module] = max(seen.get(tap.module, 0), x.numel() // width)

        hooks.append(model.get_submodule(tap.module).register_forward_pre_hook(hook))
    device = next(model.parameters()).device
    with torch.no_grad():
        model(torch.zeros(1, 1, 28, 28, device=device))
    for h in hooks:
        h.remove()
    return max(
        8 * num_models * seg.size * seen[tap.module] * batch_size
        for tap in graph.taps
        for seg in tap.segments
    )


def memory_worker(arch: str, num_models: int, mode: str, device: str, batch_size: int, batches: int) -> dict:
    """Runs in a fresh process: peak extra memory of a plain forward or of the statistics pass."""
    dev = torch.device(device)
    torch.manual_seed(0)
    models = [model_from_spec(arch).to(dev).eval() for _ in range(num_models)]
    graph = trace_graph(models[0], torch.randn(2, 1, 28, 28, device=dev))
    data = [torch.randn(batch_size, 1, 28, 28, device=dev) for _ in range(batches)]
    block = _largest_block_bytes(models[0], graph, num_models, batch_size)
    with torch.no_grad():  # lazy kernel / thread-pool set-up goes into the baseline
        for m in models:
            m(data[0][:2])
    if dev.type == "cuda":
        sync(dev)
        baseline = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        reset = True
    else:
        baseline = _status_bytes("VmRSS") or 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        reset = _reset_peak_rss()
    acc = None
    if mode == "pass":
        collector = FeatureMomentsCollector(graph)
        collect_statistics(models, graph, data, collectors=[collector], progress=False)
        acc = sum(t.nbytes for t in collector.states())
    elif mode == "forward":
        with torch.no_grad():
            for x in data:
                for m in models:
                    m(x)
    else:
        raise ValueError(f"mode must be 'pass' or 'forward', got {mode!r}")
    if dev.type == "cuda":
        sync(dev)
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        peak = _status_bytes("VmHWM") or 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "bound_bytes": accumulator_bound_bytes(graph, num_models),
        "accumulator_bytes": acc,
        "largest_block_bytes": block,
        "baseline_bytes": baseline,
        "peak_extra_bytes": peak - baseline,
        "peak_reset": reset,
        "spaces": {s: graph.space(s).size for s in tapped_spaces(graph)},
    }


def _run_worker(args: Sequence[str], timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(SCRIPT), *args, "--worker-out", str(out)]
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
        start = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        wall = time.perf_counter() - start
        if run.returncode != 0 or not out.is_file():
            raise RuntimeError(f"worker {' '.join(args)} failed ({run.returncode}):\n{run.stderr[-3000:]}")
        return {**json.loads(out.read_text()), "process_s": wall}


def memory_section(
    archs: Sequence[str] = ("resnet20x1", "resnet20x4", "vgg11_bn"),
    num_models: Sequence[int] = (2, 3),
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    batches: int = 2,
    timeout: float = 600,
) -> list[dict[str, Any]]:
    """One row per (arch, N): bound, accumulator bytes, peak extra of the pass and of a plain forward."""
    for a in archs:
        model_from_spec(a)  # a bad name fails here, not in a subprocess
    device = torch.device(device)
    rows = []
    for arch in archs:
        for n in num_models:
            common = ["--memory-worker", arch, str(n), "--device", str(device)]
            common += ["--memory-batch-size", str(batch_size), "--memory-batches", str(batches)]
            fwd = _run_worker([*common, "--memory-mode", "forward"], timeout)
            got = _run_worker([*common, "--memory-mode", "pass"], timeout)
            rows.append(
                {
                    "arch": arch,
                    "N": n,
                    "device": str(device),
                    "spaces": len(got["spaces"]),
                    "bound_bytes": got["bound_bytes"],
                    "bound_mib": got["bound_bytes"] / MIB,
                    "accumulator_bytes": got["accumulator_bytes"],
                    "largest_block_mib": got["largest_block_bytes"] / MIB,
                    "pass_peak_extra_mib": got["peak_extra_bytes"] / MIB,
                    "forward_peak_extra_mib": fwd["peak_extra_bytes"] / MIB,
                    "pass_minus_forward_mib": (got["peak_extra_bytes"] - fwd["peak_extra_bytes"]) / MIB,
                    "peak_reset": got["peak_reset"] and fwd["peak_reset"],
                    "space_sizes": got["spaces"],
                }
            )
    return rows


MEMORY_COLUMNS = [
    Column("arch", "arch"),
    Column("N", "N"),
    Column("device", "device"),
    Column("spaces", "merge points"),
    Column("bound_mib", "bound Σ(N·n)²·8 (MiB)", ".2f"),
    Column("accumulator_bytes", "accumulators (bytes)", "d"),
    Column("largest_block_mib", "largest batch block (MiB)", ".2f"),
    Column("pass_peak_extra_mib", "pass: peak extra (MiB)", ".1f"),
    Column("forward_peak_extra_mib", "plain forward: peak extra (MiB)", ".1f"),
    Column("pass_minus_forward_mib", "pass − forward (MiB)", ".1f"),
]
MEMORY_NOTES = (
    "Randomly initialised models, {batches} batches of {batch}×1×28×28, one fresh process per "
    "measurement. bound: Σ over the observed merge points of (N·n)²·8 bytes (the float64 Σffᵀ "
    "matrices); accumulators: the summed nbytes of the collector's state tensors after the pass "
    "(count, Σf, Σffᵀ, i.e. Σ 8·((N·n)² + N·n + 1)); largest batch block: the biggest transient "
    "float64 (N·n × samples-per-batch) matrix the pass fills at one tap. peak extra: {how}, minus "
    "the baseline after the models and the data are loaded (and one 2-image warm-up forward); "
    "the plain forward is N no-grad forwards over the same batches."
)


# ================================================================== ddp
def save_source_checkpoints(sources: Sequence[SourceClassifier], directory: Path) -> list[Path]:
    """Write each source as a ``SourceClassifier`` checkpoint (what a DDP subprocess can load)."""
    paths = []
    for i, s in enumerate(sources):
        if not isinstance(s, SourceClassifier):
            raise TypeError(
                f"sources[{i}] is a {type(s).__name__}; the DDP run needs SourceClassifier sources"
            )
        path = directory / f"source{i}.ckpt"
        ckpt = {"state_dict": s.state_dict(), "hyper_parameters": dict(s.hparams)}
        torch.save({**ckpt, "pytorch-lightning_version": pl.__version__}, path)
        paths.append(path)
    return paths


def ddp_worker(
    sources: Sequence[str], devices: int, accelerator: str, calibration_size: int, merged_path: str
) -> dict:
    """Runs in a fresh process (rank 0 of ``devices``): validate MergeModule(zipit), save the merge."""
    from safetensors.torch import save_file

    loaded = [SourceClassifier.load_from_checkpoint(p, map_location="cpu") for p in sources]
    dm = perf_datamodule(loaded, calibration_size)
    module = MergeModule(
        sources=list(sources), method=METHODS["zipit"](), evaluate_sources=False, evaluate_ensemble=False
    )
    strategy = "ddp" if devices > 1 else "auto"
    start = time.perf_counter()
    with quiet():
        trainer = quiet_trainer(accelerator, devices, strategy=strategy)
        trainer.validate(module, datamodule=MergeDataModule(dm), verbose=False)
    seconds = time.perf_counter() - start
    if trainer.is_global_zero:
        state = {k: v.detach().cpu().contiguous() for k, v in module.merged.state_dict().items()}
        save_file(state, merged_path)
    return {
        "validate_s": seconds,
        "joint_acc": 100 * module.results["merged/joint_acc"],
        "world_size": trainer.world_size,
        "global_zero": trainer.is_global_zero,
    }


def compare_states(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Bitwise equality of two state dicts, of their parameters alone, and the largest difference."""
    if a.keys() != b.keys():
        raise KeyError(f"the merged models have different tensors: {sorted(a.keys() ^ b.keys())}")
    diff = {k: (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0 for k in a}
    buffers = {k for k in a if "running_" in k or "num_batches_tracked" in k}
    return {
        "bitwise_identical": all(torch.equal(a[k], b[k]) for k in a),
        "params_identical": all(torch.equal(a[k], b[k]) for k in a if k not in buffers),
        "max_abs_diff": max(diff.values(), default=0.0),
        "differing": sorted(k for k in a if not torch.equal(a[k], b[k])),
    }


def ddp_section(
    sources: Sequence[SourceClassifier],
    *,
    devices: Sequence[int] = (1, 2),
    device: str | torch.device = "cpu",
    calibration_size: int = 2000,
    timeout: float = 600,
) -> list[dict[str, Any]]:
    """One row per process count; the merge of every row is compared with the first row's."""
    from safetensors.torch import load_file

    device = torch.device(device)
    if device.type == "cuda":
        devices = [d for d in devices if d <= torch.cuda.device_count()]
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_source_checkpoints(sources, Path(tmp))
        for k in devices:
            merged = Path(tmp) / f"merged_{k}.safetensors"
            args = ["--ddp-worker", *map(str, paths), "--ddp-devices", str(k), "--device", str(device)]
            args += ["--calibration-size", str(calibration_size), "--merged-out", str(merged)]
            got = _run_worker(args, timeout)
            state = load_file(merged)
            reference = reference or (k, state)
            same = compare_states(reference[1], state)
            rows.append(
                {
                    "processes": k,
                    "device": str(device),
                    "strategy": "ddp" if k > 1 else "single",
                    "validate_s": got["validate_s"],
                    "process_s": got["process_s"],
                    "joint_acc": got["joint_acc"],
                    "vs": f"{reference[0]} process(es)",
                    **same,
                    "differing": ", ".join(same["differing"]) or "none",
                }
            )
    return rows


DDP_COLUMNS = [
    Column("processes", "processes"),
    Column("device", "device"),
    Column("strategy", "strategy"),
    Column("validate_s", "trainer.validate (s)", ".1f"),
    Column("process_s", "whole process (s)", ".1f"),
    Column("joint_acc", "joint acc %", ".2f"),
    Column("vs", "compared with"),
    Column("bitwise_identical", "bitwise identical"),
    Column("params_identical", "parameters identical"),
    Column("max_abs_diff", "max abs diff", ".2e"),
]
DDP_NOTES = (
    "trainer.validate(MergeModule(zipit α=0.3 β=0.125)) on the sources below, {calib} calibration "
    "images, the 10k test images, sources and ensemble not scored; every run is its own subprocess. "
    "trainer.validate time is rank 0's and includes starting the second process and the process group; "
    "whole process adds Python/torch start-up and loading. The merged state_dict saved by rank 0 is "
    "compared with the 1-process one: bitwise over every tensor, and over the parameters alone "
    "(BatchNorm running statistics are sums across ranks, so their last bits may differ)."
    " On a 2-core machine 2 processes share the same cores and cannot be much faster."
)


# ================================================================== CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--out", default=None, help="folder for perf_<section>.md/.json (default: stdout only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--calibration-size", type=int, default=2000, help="images in the statistics pass")
    p.add_argument("--no-module-check", action="store_true", help="skip the whole-MergeModule e2e runs")
    p.add_argument("--memory-archs", nargs="+", default=["resnet20x1", "resnet20x4", "vgg11_bn"])
    p.add_argument("--memory-models", type=int, nargs="+", default=[2, 3], help="values of N")
    p.add_argument("--memory-batch-size", type=int, default=128)
    p.add_argument("--memory-batches", type=int, default=2)
    p.add_argument("--ddp-devices", type=int, nargs="+", default=[1, 2], help="process counts")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    # internal: the subprocess workers
    p.add_argument("--memory-worker", nargs=2, metavar=("ARCH", "N"), help=argparse.SUPPRESS)
    p.add_argument("--memory-mode", choices=["pass", "forward"], help=argparse.SUPPRESS)
    p.add_argument("--ddp-worker", nargs="+", metavar="CKPT", help=argparse.SUPPRESS)
    p.add_argument("--merged-out", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = [args.calibration_size, args.memory_batch_size, args.memory_batches, *args.memory_models]
    if min(sizes) < 1 or min(args.ddp_devices) < 1:
        p.error("--calibration-size, --memory-*, --ddp-devices must be positive")
    if min(args.memory_models) < 2:
        p.error(f"--memory-models: merging needs N >= 2, got {args.memory_models}")
    return args


def write_section(section: str, rows: list[dict], args: argparse.Namespace, argv, machine: str) -> None:
    fmt = {"calib": args.calibration_size, "test": "10k", "batches": args.memory_batches}
    fmt |= {"batch": args.memory_batch_size}
    fmt["how"] = (
        "torch.cuda.max_memory_allocated"
        if args.device.startswith("cuda")
        else "peak RSS (VmHWM of /proc/self/status, reset with clear_refs after loading)"
    )
    columns, notes, title = {
        "e2e": (E2E_COLUMNS, E2E_NOTES, "End-to-end merge time by stage (default pair, ResNet-20×1)"),
        "memory": (MEMORY_COLUMNS, MEMORY_NOTES, "Statistics-pass memory against the accumulator bound"),
        "ddp": (DDP_COLUMNS, DDP_NOTES, "MergeModule validate with 1 vs 2 DDP processes"),
    }[section]
    print(f"\n{title}\n" + markdown_table(columns, rows))
    if args.out is not None:
        paths = write_results(
            args.out,
            f"perf_{section}",
            title=title,
            columns=columns,
            rows=rows,
            command=command_line("benchmarks/perf.py", argv),
            machine=machine,
            notes=notes.format(**fmt),
        )
        print("wrote " + ", ".join(map(str, paths)))


def run_worker(args: argparse.Namespace) -> None:
    if args.memory_worker:
        arch, n = args.memory_worker
        result = memory_worker(
            arch, int(n), args.memory_mode, args.device, args.memory_batch_size, args.memory_batches
        )
    else:
        accel = accelerator_of(torch.device(args.device))
        result = ddp_worker(
            args.ddp_worker, args.ddp_devices[0], accel, args.calibration_size, args.merged_out
        )
        if not result["global_zero"]:
            return
    Path(args.worker_out).write_text(json.dumps(result))


def main(argv: Sequence[str] | None = None) -> dict[str, list[dict]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_worker or args.ddp_worker:
        run_worker(args)
        return {}
    from lightning_merge.models.default_pair import default_pair

    machine = machine_description(args.device)
    results: dict[str, list[dict]] = {}
    sources = default_pair() if {"e2e", "ddp"} & set(args.sections) else []
    for section in args.sections:
        if section == "e2e":
            rows = e2e_section(
                sources,
                methods=args.methods,
                device=args.device,
                datamodule=perf_datamodule(sources, args.calibration_size),
                module_check=not args.no_module_check,
            )
        elif section == "memory":
            rows = memory_section(
                args.memory_archs,
                args.memory_models,
                device=args.device,
                batch_size=args.memory_batch_size,
                batches=args.memory_batches,
            )
        else:
            rows = ddp_section(
                sources, devices=args.ddp_devices, device=args.device, calibration_size=args.calibration_size
            )
        results[section] = rows
        write_section(section, rows, args, argv, machine)
    return results


if __name__ == "__main__":
    main()
