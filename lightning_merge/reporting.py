"""Presenting a merge's results: a rich table on the console, and a W&B table, bar chart and
correlation heatmaps (matplotlib PNGs) through Lightning's ``WandbLogger``. Rank zero only.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.loggers import Logger, WandbLogger
from rich.console import Console
from rich.table import Table

#: Row order of every table: the merge first, then the references.
_ORDER = ("merged", "ensemble")


def model_rows(results: Mapping[str, float]) -> list[str]:
    """Model names in ``results`` (keys ``<model>/<metric>``): merged, ensemble, then sources."""
    names = list(dict.fromkeys(k.split("/", 1)[0] for k in results))
    return sorted(names, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))


def result_columns(num_tasks: int) -> list[str]:
    return ["joint_acc", *[f"task{t}_acc" for t in range(num_tasks)]]


def result_rows(results: Mapping[str, float], num_tasks: int) -> list[list[Any]]:
    """``[[model, joint, task0, ...]]`` with ``None`` where a metric is undefined."""
    cols = result_columns(num_tasks)
    return [[name, *[results.get(f"{name}/{c}") for c in cols]] for name in model_rows(results)]


def results_table(results: Mapping[str, float], num_tasks: int, title: str = "merge results") -> Table:
    """Accuracy (%) per model (rows) and joint / per-task (columns)."""
    table = Table(title=title)
    table.add_column("model")
    for c in result_columns(num_tasks):
        table.add_column(c.replace("_acc", " acc"), justify="right")
    for name, *values in result_rows(results, num_tasks):
        table.add_row(name, *["—" if v is None else f"{100 * v:.2f}" for v in values])
    return table


def print_results(results: Mapping[str, float], num_tasks: int, console: Console | None = None) -> None:
    (console or Console()).print(results_table(results, num_tasks))


def bar_chart(results: Mapping[str, float], num_tasks: int) -> Any:
    """A grouped bar chart (PIL image) of every model's joint and per-task accuracy."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    rows = result_rows(results, num_tasks)
    cols = result_columns(num_tasks)
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
        "merge/results", columns=["model", *result_columns(num_tasks)], data=result_rows(results, num_tasks)
    )
    logger.log_image("merge/accuracy", images=[bar_chart(results, num_tasks)])
    maps = correlation_heatmaps(stats, graph, heatmaps)
    if maps:
        logger.log_image("merge/correlation", images=list(maps.values()), caption=list(maps))
