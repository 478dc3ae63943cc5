"""Presenting a merge's results: a rich table on the console (accuracies, and nonzero parameters and
FLOPs relative to one source, counted by :mod:`lightning_merge.cost` the same way for every row), and
a W&B table, bar chart and correlation heatmaps (matplotlib PNGs) through Lightning's
``WandbLogger``. Rank zero only.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.loggers import Logger, WandbLogger
from rich.console import Console
from rich.table import Table
from torch import nn

from lightning_merge.cost import Cost, cost

#: Row order of every table: the merge first, then the references.
_ORDER = ("merged", "ensemble", "ensemble_reset")
#: Metric-name tags of the scoring rules (``lightning_merge.evaluation.SCORING_TAGS``), longest first.
_TAGS = ("phs_", "")


def model_rows(results: Mapping[str, float]) -> list[str]:
    """Model names in ``results`` (keys ``<model>/<metric>``): merged, ensemble, then sources."""
    names = list(dict.fromkeys(k.split("/", 1)[0] for k in results))
    return sorted(names, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))


def scoring_tag(results: Mapping[str, float]) -> str:
    """The scoring rule's tag in ``results``' metric names (``""``: raw logits)."""
    metrics = [k.split("/", 1)[1] for k in results if "/" in k]
    return next((t for t in _TAGS if any(m.startswith(f"{t}joint_acc") for m in metrics)), "")


def result_columns(num_tasks: int, tag: str = "") -> list[str]:
    return [f"{tag}joint_acc", *[f"{tag}task{t}_acc" for t in range(num_tasks)]]


def result_rows(results: Mapping[str, float], num_tasks: int) -> list[list[Any]]:
    """``[[model, joint, task0, ...]]`` with ``None`` where a metric is undefined."""
    cols = result_columns(num_tasks, scoring_tag(results))
    return [[name, *[results.get(f"{name}/{c}") for c in cols]] for name in model_rows(results)]


def model_costs(
    merged: nn.Module, sources: Sequence[nn.Module], input_shape: Sequence[int]
) -> dict[str, Cost]:
    """Nonzero params / FLOPs of the merge, each source and the ensemble (= the N sources side by side)."""
    costs = {"merged": cost(merged, input_shape)} | {
        f"source{i}": cost(m, input_shape) for i, m in enumerate(sources)
    }
    parts = [costs[f"source{i}"] for i in range(len(sources))]
    return costs | {"ensemble": Cost(sum(c.params for c in parts), sum(c.flops for c in parts))}


def _relative(name: str, costs: Mapping[str, Cost]) -> list[str]:
    """``[params ×, FLOPs ×]`` of a row against source 0 (a treated copy costs what its original does)."""
    own, unit = costs.get(name.removesuffix("_reset")), costs.get("source0")
    if own is None or unit is None:
        return ["—", "—"]
    return [f"{r:.2f}" for r in own.relative_to(unit)]


def results_table(
    results: Mapping[str, float],
    num_tasks: int,
    title: str = "merge results",
    costs: Mapping[str, Cost] | None = None,
) -> Table:
    """Accuracy (%) per model (rows) and joint / per-task (columns); with ``costs``, relative costs."""
    tag = scoring_tag(results)
    table = Table(title=f"{title} (scoring: {'per-head softmax' if tag else 'raw logits'})")
    table.add_column("model")
    for c in result_columns(num_tasks, tag):
        table.add_column(c.removeprefix(tag).replace("_acc", " acc"), justify="right")
    if costs:
        table.add_column("params ×", justify="right")
        table.add_column("FLOPs ×", justify="right")
    for name, *values in result_rows(results, num_tasks):
        cells = ["—" if v is None else f"{100 * v:.2f}" for v in values]
        table.add_row(name, *cells, *(_relative(name, costs) if costs else []))
    return table


def print_results(
    results: Mapping[str, float],
    num_tasks: int,
    console: Console | None = None,
    costs: Mapping[str, Cost] | None = None,
) -> None:
    (console or Console()).print(results_table(results, num_tasks, costs=costs))


def bar_chart(results: Mapping[str, float], num_tasks: int) -> Any:
    """A grouped bar chart (PIL image) of every model's joint and per-task accuracy."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    rows = result_rows(results, num_tasks)
    cols = result_columns(num_tasks, scoring_tag(results))
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(rows), 3.5))
    width = 0.8 / len(cols)
    x = np.arange(len(rows))
    for j, c in enumerate(cols):
        values = [100 * (r[1 + j] if r[1 + j] is not None else float("nan")) for r in rows]
        ax.bar(x + (j - (len(cols) - 1) / 2) * width, values, width, label=c.replace("_acc", ""))
    ax.set_xticks(x, [r[0] for r in rows])
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small", ncols=len(cols))
    return _to_image(fig)


def correlation_heatmaps(stats: Any, graph: Any, count: int) -> dict[str, Any]:
    """``{space: image}`` of the N·n × N·n feature correlation at ``count`` merge points spread over depth."""
    moments = getattr(stats, "moments", None) or {}
    spaces = [s.name for s in graph.spaces if s.name in moments] if graph is not None else list(moments)
    if count <= 0 or not spaces:
        return {}
    picks = sorted({round(i * (len(spaces) - 1) / max(count - 1, 1)) for i in range(count)})
    return {spaces[i]: _heatmap(spaces[i], moments[spaces[i]]) for i in picks}


def _heatmap(name: str, moments: Any) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    corr = moments.correlation().to(torch.float32).cpu().numpy()
    n = corr.shape[0] // moments.num_models
    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    im = ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1)
    for k in range(1, moments.num_models):
        ax.axhline(k * n - 0.5, color="k", lw=0.6)
        ax.axvline(k * n - 0.5, color="k", lw=0.6)
    ax.set_title(f"{name}: correlation of {moments.num_models}×{n} features", fontsize="small")
    fig.colorbar(im, ax=ax)
    return _to_image(fig)


def _to_image(fig: Any) -> Any:
    import matplotlib.pyplot as plt
    from PIL import Image

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def log_to_logger(
    logger: Logger, results: Mapping[str, float], num_tasks: int, stats: Any, graph: Any, heatmaps: int
) -> None:
    """Send the results table, the bar chart and the heatmaps to a ``WandbLogger`` (others: nothing)."""
    if not isinstance(logger, WandbLogger):
        return
    logger.log_table(
        "merge/results",
        columns=["model", *result_columns(num_tasks, scoring_tag(results))],
        data=result_rows(results, num_tasks),
    )
    logger.log_image("merge/accuracy", images=[bar_chart(results, num_tasks)])
    maps = correlation_heatmaps(stats, graph, heatmaps)
    if maps:
        logger.log_image("merge/correlation", images=list(maps.values()), caption=list(maps))
