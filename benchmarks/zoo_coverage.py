"""Twin recovery over torchvision's classification zoo: merged exactly, or refused with a named op.

For every architecture (random weights, never downloaded; eval mode; small inputs) the chain
trace → ``check_equivalence`` → merge the model with a channel-permuted copy of itself must give
the model back (relative output error < 1e-5) for every method, or the tracer must refuse it
up front (``UnsupportedOpError``/``GraphError``). Before the run the model's constant tensors are
redrawn where torchvision zero-initialises a Linear (the heads of ViT: the output is constant and
the relative error 0/0 = NaN) and BatchNorm statistics are set from the calibration batch
(``calibrate_batchnorm``): MobileNet's fan-out init makes eval-mode activations vanish (features
~1e-7, correlations tied everywhere), which tests nothing.

Run in chunks (rows are merged into the existing JSON; the table is rewritten each time):

    OMP_NUM_THREADS=1 python benchmarks/zoo_coverage.py --archs resnet18 mobilenet_v2 ...
    OMP_NUM_THREADS=1 python benchmarks/zoo_coverage.py --all --max-params 60
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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
#: smallest inputs the architectures accept (default 32×32); ViTs get ``image_size`` set small
SIZES = {"alexnet": 64, "googlenet": 64, "inception_v3": 80, "maxvit_t": 224}
SIZES.update({n: 64 for n in ("swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b")})


def _method(name: str) -> Any:
    """The method of a table column, built from its class and the column's arguments."""
    cls = next(c for c in ALL_METHODS if c.name == name)
    return cls(**METHODS[name])


def merge_with(method: str, models: list[nn.Module], graph: Any, stats: Any, data: Any) -> nn.Module:
    """The one call site of a method's merge (its return type may become a result object)."""
    result = _method(method).merge(models, graph=graph, stats=stats, data=data)
    return getattr(result, "model", result)


def build(arch: str) -> tuple[nn.Module, int]:
    """Random-weight model and its input size."""
    kwargs: dict[str, Any] = {}
    size = SIZES.get(arch, 32)
    if arch.startswith("vit_"):
        size = 28 if arch == "vit_h_14" else 32
        kwargs["image_size"] = size
    torch.manual_seed(0)
    return torchvision.models.get_model(arch, weights=None, **kwargs).eval(), size


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
    model: nn.Module, x: torch.Tensor, methods: list[str], seed: int = 7
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
    data = DataLoader(TensorDataset(x), batch_size=len(x))
    requires = sorted(set().union(*(_method(name).requires for name in methods)))
    stats = collect_statistics([model, twin], graph, data, requires=requires, progress=False)
    with torch.no_grad():
        ref = model(x)
    out: dict[str, str] = {}
    for name in methods:
        t = time.perf_counter()
        try:
            merged = merge_with(name, [model, twin], graph, stats, data).eval()
            with torch.no_grad():
                err = relative_error(merged(x), ref)
            out[name] = "ok" if err < TOL else f"error {err:.1e}"
        except Exception as e:  # recorded in the table: the point is to see every failure
            out[name] = f"{type(e).__name__}: {str(e)[:160]}"
        info[f"{name}_s"] = round(time.perf_counter() - t, 1)
    return out, info


def run_arch(arch: str, methods: list[str], images: int) -> dict[str, Any]:
    t = time.perf_counter()
    row: dict[str, Any] = {"arch": arch}
    try:
        model, size = build(arch)
        row["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        x = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0))
        row["input"] = f"{images}×3×{size}×{size}"
        row["methods"], info = twin_recovery(model, x, methods)
        row.update(info)
        row["status"] = "ok" if all(v == "ok" for v in row["methods"].values()) else "failed"
    except (GraphError, AssertionError) as e:  # refused up front (named op) or graph check failed
        row["status"] = "refused"
        row["error"] = f"{type(e).__name__}: {str(e).split('. Give the groups')[0][:220]}"
    except Exception as e:
        row["status"] = "crashed"
        row["error"] = f"{type(e).__name__}: {str(e)[:220]}"
    row["total_s"] = round(time.perf_counter() - t, 1)
    return row


def write(rows: dict[str, dict], command: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    all_archs = torchvision.models.list_models(module=torchvision.models)
    meta = {
        "command": command,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}",
        "tolerance": TOL,
        "methods": METHODS,
    }
    (RESULTS / "zoo_coverage.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "zoo_coverage.md").write_text(render(rows, all_archs, meta))


def render(rows: dict[str, dict], all_archs: list[str], meta: dict) -> str:
    counts: dict[str, int] = {}
    for arch in all_archs:
        status = rows.get(arch, {}).get("status", "not run")
        counts[status] = counts.get(status, 0) + 1
    head = ["arch", "params (M)", "input", *METHODS, "time (s)"]
    lines = [
        "# torchvision zoo: twin recovery (merge a model with a permuted copy of itself)",
        "",
        f"Regenerate (in chunks, rows are merged): `{meta['command']}`",
        f"Machine: {meta['machine']}. ok = relative output error < {meta['tolerance']:g}.",
        f"Summary over {len(all_archs)} architectures: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for arch in all_archs:
        r = rows.get(arch)
        if r is None:
            lines.append(f"| {arch} | | | " + " | ".join(["not run"] * len(METHODS)) + " | |")
            continue
        cells = [r["methods"].get(m, "") for m in METHODS] if "methods" in r else [r.get("error", "")]
        cells += [""] * (len(METHODS) - len(cells))
        cells = [c.replace("|", "\\|") for c in cells]
        lines.append(
            f"| {arch} | {r.get('params_M', '')} | {r.get('input', '')} | "
            + " | ".join(cells)
            + f" | {r['total_s']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None, log: Callable[[str], None] = print) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="*", default=[])
    parser.add_argument("--all", action="store_true", help="every classification architecture")
    parser.add_argument("--max-params", type=float, default=None, help="skip models above this (M)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    path = RESULTS / "zoo_coverage.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else {}
    archs = torchvision.models.list_models(module=torchvision.models) if args.all else args.archs
    command = "OMP_NUM_THREADS=1 python benchmarks/zoo_coverage.py --all --max-params 60 --images 32"
    for arch in archs:
        if args.max_params is not None:
            model, _ = build(arch)
            if sum(p.numel() for p in model.parameters()) / 1e6 > args.max_params:
                continue
        rows[arch] = run_arch(arch, args.methods, args.images)
        log(f"{arch}: {rows[arch]['status']} {rows[arch].get('methods', rows[arch].get('error'))}")
        write(rows, command)


if __name__ == "__main__":
    main()
