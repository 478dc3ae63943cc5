"""Twin recovery over torchvision's classification zoo: merged exactly, or refused with a named op.

For every architecture (random weights, never downloaded; eval mode; small inputs) the chain
trace → ``check_equivalence`` → merge the model with a channel-permuted copy of itself must give
the model back (relative output error < 1e-5) for every method, or the tracer must refuse it
up front (``UnsupportedOpError``/``GraphError``). Before the run the model's constant tensors are
redrawn where torchvision zero-initialises a Linear (the heads of ViT: the output is constant and
the relative error 0/0 = NaN) and BatchNorm statistics are set from the calibration batch
(``calibrate_batchnorm``): MobileNet's fan-out init makes eval-mode activations vanish (features
~1e-7, correlations tied everywhere), which tests nothing.

Inputs are 64×64 for the convolutional nets (their last stage, at stride 32, then sees 2×2 maps):
at 32×32 it sees 1×1 maps, one sample per image, and the twin is not identifiable from the data
(squeezenet1_1: ReLU features active on a single image tie at correlation 1 and Permute/ZipIt!
swap them, 4e-4 in float32 *and* float64; regnet_x_400mf: PLeaS' refit of 400-input layers from
32 rows, 2.8e-5), which is the calibration set's fault, not the merge's.

Each method gathers its own statistics and frees them after its merge (so the peak memory is one
method's, not all five's: densenet161, efficientnet_b5 and convnext_small were OOM-killed on a 23 GB
host when the statistics of every method were held at once); a method's time includes its statistics.
Each architecture runs in its own subprocess (memory is returned, a time limit applies); rows are
merged into the existing JSON, architectures already there are skipped unless ``--rerun``, and the
table is rewritten after each one. Models over ``--max-params`` get a "skipped (size)" row:

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/zoo_coverage.py --all --max-params 30
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/zoo_coverage.py --only resnet18 mobilenet_v2 --rerun

(``PYTHONPATH=.``: this checkout's package, also where the venv has another one installed editable.)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_merge
from lightning_merge.apply.twin import check_equivalence
from lightning_merge.graph import (
    GraphError,
    permute_model,
    random_permutations,
    trace_graph,
)
from lightning_merge.graph.equivalence import calibrate_batchnorm
from lightning_merge.methods import ALL_METHODS
from lightning_merge.stats.collect import collect_statistics

RESULTS = Path(__file__).parent / "results"
TOL = 1e-5
#: method name -> constructor kwargs; PLeaS' ridge is tiny so width 1 can reproduce the model
METHODS: dict[str, dict[str, Any]] = {
    "permute": {},
    "zipit": {"alpha": 0.0, "beta": 0.0},
    "mudsc": {},
    "weight_matching": {},
    "pleas": {"width": 1.0, "ridge": 1e-8},
}
#: input side: 64 for the convolutional nets (2×2 maps at stride 32), the fixed sizes some nets need
SIZE = 64
SIZES = {"inception_v3": 80, "maxvit_t": 224}
#: images in the calibration set, read in batches of BATCH
IMAGES, BATCH = 16, 4
COMMAND = (
    "PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/zoo_coverage.py --all --max-params 30 --timeout 600"
)


#: the float64 recheck's settings where they differ: PLeaS at ridge 0 (its pseudo-inverse, exact on
#: the data's span). Ridge 1e-8 biases the twin by about that much per layer: efficientnet_b3 in
#: float64 comes back to 4.1e-6 at ridge 1e-8, 4.1e-8 at 1e-10 and 6.5e-14 at 0 (float32: 9.7e-6 at
#: all three), and the deepest EfficientNets (b5, b6, v2_m) pass the tolerance only at ridge 0.
FLOAT64_METHODS: dict[str, dict[str, Any]] = {"pleas": {"ridge": 0.0}}


def _method(name: str, float64: bool = False) -> Any:
    """The method of a table column, built from its class and the column's arguments."""
    cls = next(c for c in ALL_METHODS if c.name == name)
    return cls(**{**METHODS[name], **(FLOAT64_METHODS.get(name, {}) if float64 else {})})


def merge_with(
    method: str, models: list[nn.Module], graph: Any, stats: Any, data: Any, float64: bool = False
) -> nn.Module:
    """The one call site of a method's merge (its return type may become a result object)."""
    result = _method(method, float64).merge(models, graph=graph, stats=stats, data=data)
    return getattr(result, "model", result)


def build(arch: str, device: str | None = None) -> tuple[nn.Module, int]:
    """Random-weight model and its input size (``device="meta"``: shapes only, to count parameters)."""
    kwargs: dict[str, Any] = {}
    size = SIZES.get(arch, SIZE)
    if arch.startswith("vit_"):  # ViTs take any image_size divisible by the patch
        size = 28 if arch == "vit_h_14" else 32
        kwargs["image_size"] = size
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
    return model.eval(), size


def params_millions(arch: str) -> float:
    """Parameters of the ImageNet configuration, from torchvision's weight metadata (nothing is
    downloaded or built: RegNet-Y 128GF alone is 645 M); building it when there is no entry."""
    weights = list(torchvision.models.get_model_weights(arch))
    if weights:
        return round(weights[0].meta["num_params"] / 1e6, 1)
    model, _ = build(arch)
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 1)


@torch.no_grad()
def redraw_zero_linears(model: nn.Module, seed: int = 0) -> None:
    """Zero-initialised Linear weights (torchvision's ViT head) get a N(0, 1/fan_in) draw."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear) and not bool(m.weight.any()):
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / m.in_features**0.5)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm().clamp_min(torch.finfo(ref.dtype).tiny))


def twin_recovery(
    model: nn.Module, x: torch.Tensor, methods: list[str], seed: int = 7, batch: int | None = None
) -> tuple[dict[str, str], dict[str, Any]]:
    """Per method "ok" or the failure; raises GraphError/EquivalenceError when the graph is refused."""
    redraw_zero_linears(model)
    calibrate_batchnorm(model, x)
    model.eval()
    info: dict[str, Any] = {}
    t = time.perf_counter()
    graph = trace_graph(model, x[:2])
    info["spaces"] = len(graph.spaces)
    info["equivalence"] = check_equivalence(model, graph, x[:2])
    info["trace_s"] = round(time.perf_counter() - t, 1)
    twin = permute_model(copy.deepcopy(model), graph, random_permutations(graph, seed))
    data = DataLoader(TensorDataset(x), batch_size=batch or len(x))
    with torch.no_grad():
        ref = model(x)
    out: dict[str, str] = {}
    for name in methods:  # each method's own statistics, freed after it: the peak is one method's
        t = time.perf_counter()
        try:
            requires = sorted(_method(name).requires)
            stats = (
                collect_statistics([model, twin], graph, data, requires=requires, progress=False)
                if requires
                else None
            )
            merged = merge_with(name, [model, twin], graph, stats, data, x.dtype == torch.float64).eval()
            del stats
            with torch.no_grad():
                err = relative_error(merged(x), ref)
            out[name] = "ok" if err < TOL else f"error {err:.1e}"
        except Exception as e:  # recorded in the table: the point is to see every failure
            out[name] = f"{type(e).__name__}: {str(e)[:160]}"
        info[f"{name}_s"] = round(time.perf_counter() - t, 1)
    return out, info


def run_arch(arch: str, methods: list[str], images: int) -> dict[str, Any]:
    """One table row: every method's result, or why the model was refused or crashed."""
    t = time.perf_counter()
    row: dict[str, Any] = {"arch": arch}
    try:
        model, size = build(arch)
        row["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        x = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0))
        row["input"] = f"{images}×3×{size}×{size}"
        row["methods"], info = twin_recovery(model, x, methods, batch=BATCH)
        row.update(info)
        recheck_float64(arch, x, row["methods"])
        row["status"] = row_status(row["methods"])
    except (GraphError, AssertionError) as e:  # refused up front (named op) or graph check failed
        row["status"] = "refused"
        row["error"] = f"{type(e).__name__}: {str(e).split('. Give the groups')[0][:220]}"
    except Exception as e:
        row["status"] = "crashed"
        row["error"] = f"{type(e).__name__}: {str(e)[:220]}"
    row["total_s"] = round(time.perf_counter() - t, 1)
    return row


def recheck_float64(arch: str, x: torch.Tensor, results: dict[str, str]) -> None:
    """Methods over the tolerance run again with the model, data and statistics in float64.

    A wrong merge (a swapped feature, a wrong axis) stays wrong in float64 (squeezenet1_1 at 32 px:
    4e-4 in both); an error that vanishes there is float32 rounding that a solve amplified, and the
    cell says so with both numbers instead of hiding either. PLeaS runs there at ridge 0
    (:data:`FLOAT64_METHODS`): its float32 ridge is a bias of its own, not a wrong merge."""
    failed = [m for m, v in results.items() if v.startswith("error ")]
    if not failed:
        return
    model, _ = build(arch)
    again, _ = twin_recovery(model.double(), x.double(), failed, batch=BATCH)
    for m in failed:
        f32 = results[m].removeprefix("error ")
        ok64 = again[m] == "ok"
        results[m] = f"ok in float64 (float32 {f32})" if ok64 else f"{results[m]} (float64: {again[m]})"


def row_status(results: dict[str, str]) -> str:
    """ok: every method within tolerance in float32; ok (float64): some only in float64."""
    if all(v == "ok" for v in results.values()):
        return "ok"
    return "ok (float64)" if all(v.startswith("ok") for v in results.values()) else "failed"


def run_isolated(arch: str, methods: list[str], images: int, timeout: float) -> dict[str, Any]:
    """``run_arch`` in a subprocess: its memory goes back after each model and a time limit applies."""
    cmd = [sys.executable, __file__, "--worker", arch, "--images", str(images), "--methods", *methods]
    # the worker imports the package this process imported (a checkout, not an editable install's)
    path = [str(Path(lightning_merge.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    t = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    except subprocess.TimeoutExpired:
        return {
            "arch": arch,
            "status": "timeout",
            "error": f"over the {timeout:g} s limit",
            "total_s": timeout,
        }
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        row = {"arch": arch, "status": "crashed", "error": f"worker died: {tail[0][:200]}"}
        return {**row, "total_s": round(time.perf_counter() - t, 1)}
    return json.loads(lines[-1])


#: methods whose workers hold the most memory (PLeaS' joint inputs, MuDSC's weight similarities)
HEAVY = ("pleas", "mudsc")


@contextlib.contextmanager
def heavy_slot(method: str, lock: str | None) -> Iterator[None]:
    """With ``lock`` (a file shared by drivers running side by side), one heavy worker at a time:
    two PLeaS workers of large models together exceed 24 GB and the kernel kills one."""
    if lock is None or method not in HEAVY:
        yield
        return
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def run_split(
    arch: str, methods: list[str], images: int, timeout: float, lock: str | None = None
) -> dict[str, Any]:
    """One worker per method (large models): each method's peak memory alone, and a worker killed
    for memory costs one cell, not the row. Trace and graph check repeat in every worker."""
    parts = []
    for m in methods:
        with heavy_slot(m, lock):
            parts.append(run_isolated(arch, [m], images, timeout))
    done = [p for p in parts if "methods" in p]
    if not done:  # refused or crashed the same way before any method: one row-level outcome
        return parts[0]
    row = {k: v for p in done for k, v in p.items() if k not in ("methods", "status", "total_s")}
    row["methods"] = {}
    for m, p in zip(methods, parts, strict=True):
        row["methods"][m] = p["methods"][m] if "methods" in p else f"{p['status']}: {p.get('error', '')}"
    status = row_status(row["methods"])
    row["status"] = status if status != "failed" or all("methods" in p for p in parts) else "crashed"
    row["total_s"] = round(sum(p["total_s"] for p in parts), 1)
    return row


def with_earlier_cells(
    row: dict[str, Any], earlier: dict[str, Any] | None, methods: list[str]
) -> dict[str, Any]:
    """A rerun of some methods (``--methods mudsc``) keeps the row's other cells from the JSON.

    A rerun that crashed or timed out marks its own cells so; a refusal replaces the row. The time
    is the kept cells' plus this run's; the status is recomputed over all cells."""
    if earlier is None or "methods" not in earlier:
        return row
    kept = {m: v for m, v in earlier["methods"].items() if m not in methods}
    if not kept:  # every method rerun: the row is the new one as it came
        return row
    if "methods" not in row:
        if row["status"] not in ("crashed", "timeout"):  # refused up front: the whole row says so
            return row
        row = {**row, "methods": dict.fromkeys(methods, f"{row['status']}: {row.get('error', '')}")}
    cells = {**kept, **row["methods"]}
    merged = {**row, "methods": {m: cells[m] for m in METHODS if m in cells}}  # the table's order
    merged["status"] = row_status(merged["methods"])
    merged["total_s"] = round(row["total_s"] + sum(earlier.get(f"{m}_s", 0.0) for m in kept), 1)
    return merged


def machine() -> str:
    return (
        f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}"
    )


def load_rows() -> dict[str, dict]:
    path = RESULTS / "zoo_coverage.json"
    return json.loads(path.read_text())["rows"] if path.exists() else {}


def save_row(arch: str, row: dict[str, Any]) -> dict[str, dict]:
    """Re-read the JSON under a lock and replace one row: drivers running side by side (one per
    core) each add their own rows without dropping the others'."""
    RESULTS.mkdir(exist_ok=True)
    fd = os.open(RESULTS, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        rows = load_rows()
        rows[arch] = row
        write(rows)
    finally:
        os.close(fd)  # closing releases the lock
    return rows


def write(rows: dict[str, dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    all_archs = torchvision.models.list_models(module=torchvision.models)
    meta = {
        "command": COMMAND,
        "machine": machine(),
        "tolerance": TOL,
        "methods": METHODS,
        "input": f"{IMAGES} images (batches of {BATCH}), {SIZE}×{SIZE} unless the row says otherwise",
    }
    (RESULTS / "zoo_coverage.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "zoo_coverage.md").write_text(render(rows, all_archs, meta))


def summary(rows: dict[str, dict], all_archs: list[str]) -> list[str]:
    """Rows by status, and per method how many architectures it merged exactly."""
    counts: dict[str, int] = {}
    for arch in all_archs:
        status = rows.get(arch, {}).get("status", "not run")
        counts[status] = counts.get(status, 0) + 1
    n = len(all_archs)
    cells = {m: [rows.get(a, {}).get("methods", {}).get(m, "") for a in all_archs] for m in METHODS}
    strict = [f"{m} {sum(c == 'ok' for c in cells[m])}/{n}" for m in METHODS]
    loose = [f"{m} {sum(c.startswith('ok') for c in cells[m])}/{n}" for m in METHODS]
    return [
        f"Architectures: {n}; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        "",
        f"ok in float32 per method: {', '.join(strict)}",
        "",
        f"ok in float32, or in float64 where float32 missed the tolerance: {', '.join(loose)}",
    ]


NOTES = [
    "Cells: `ok`; `error e` (relative output error e, the same in float64 when noted); `ok in float64 "
    "(float32 e)`: over the tolerance in float32 only, exact once model, data and statistics are "
    "float64 (rounding a solve amplified, not a wrong merge; PLeaS there at ridge 0, its pseudo-inverse, "
    "since its ridge of 1e-8 alone biases a deep net's twin by ~1e-5; rows run before 2026-12-03 05:30 "
    "were rechecked at ridge 1e-8); an exception's type and text. Rows: "
    "`refused` (the tracer or the graph check named the op and node), `crashed`, `timeout`, "
    "`skipped (size)` (over `--max-params`), `not run` (not reached: architectures run smallest "
    "first and a run can be cut short).",
]


def render(rows: dict[str, dict], all_archs: list[str], meta: dict) -> str:
    head = ["arch", "params (M)", "input", *METHODS, "time (s)"]
    lines = [
        "# torchvision zoo: twin recovery (merge a model with a permuted copy of itself)",
        "",
        f"Regenerate (resumes; `--rerun` to redo rows): `{meta['command']}`",
        f"Machine: {meta['machine']}. Input: {meta['input']}.",
        f"ok = relative output error < {meta['tolerance']:g}.",
        "",
        *NOTES,
        "",
        *summary(rows, all_archs),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for arch in all_archs:
        r = rows.get(arch, {"status": "not run", "total_s": ""})
        if "methods" in r:
            cells = [r["methods"].get(m, "") for m in METHODS]
        else:
            cells = [f"{r['status']}: {r['error']}" if "error" in r else r["status"]] + [""] * (
                len(METHODS) - 1
            )
        cells = [c.replace("|", "\\|") for c in cells]
        lines.append(
            f"| {arch} | {r.get('params_M', '')} | {r.get('input', '')} | "
            + " | ".join(cells)
            + f" | {r['total_s']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", default=[], help="these architectures")
    parser.add_argument("--all", action="store_true", help="every classification architecture")
    parser.add_argument("--max-params", type=float, default=None, help="skip models above this (M), as a row")
    parser.add_argument("--rerun", action="store_true", help="redo architectures already in the JSON")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per architecture")
    parser.add_argument("--images", type=int, default=IMAGES)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument(
        "--split-above", type=float, default=40.0, help="one worker per method above this many M params"
    )
    parser.add_argument(
        "--heavy-lock", help="a lock file shared by drivers side by side: one PLeaS/MuDSC worker at a time"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.worker:  # one architecture, its row as the last line of stdout
        print(json.dumps(run_arch(args.worker, args.methods, args.images)))
        return
    rows = load_rows()
    archs = torchvision.models.list_models(module=torchvision.models) if args.all else args.only
    sizes = {arch: params_millions(arch) for arch in archs}
    limit = float("inf") if args.max_params is None else args.max_params
    # size skips first (instant), then smallest first: a cut-short run covers the most architectures
    for arch in sorted(archs, key=lambda a: (sizes[a] <= limit, sizes[a])):
        if arch in rows and not args.rerun:
            continue
        size = sizes[arch]
        if size > limit:
            why = f"{size} M params > --max-params {args.max_params:g}"
            row = {"arch": arch, "params_M": size, "status": "skipped (size)", "error": why, "total_s": 0}
        else:
            if size > args.split_above:
                row = run_split(arch, args.methods, args.images, args.timeout, args.heavy_lock)
            else:
                row = run_isolated(arch, args.methods, args.images, args.timeout)
        row = with_earlier_cells(row, rows.get(arch), args.methods)
        log(f"{arch}: {row['status']} {row.get('methods', row.get('error'))}")
        rows = save_row(arch, row)
    write(load_rows())  # no architecture given: the table is redrawn from the JSON


if __name__ == "__main__":
    main()
