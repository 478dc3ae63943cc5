"""Writing benchmark results: one Markdown table + the raw JSON, with the command line and the machine.

Every number in ``benchmarks/results/*.md`` comes from the matching ``.json`` row through the column's
format, so no figure is ever typed by hand (``benchmarks/report.py`` assembles the ``.md`` files).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import torch


@dataclass(frozen=True)
class Column:
    """A table column: ``key`` in the row dicts, its ``header`` and a ``format`` spec for numbers."""

    key: str
    header: str
    format: str = ""


def machine_description(device: str | torch.device | None = None) -> str:
    """OS, CPU, cores, the accelerator when ``device`` is CUDA (None: CUDA when available), library
    versions and thread count."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    accel = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU run"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"
        f"{load}; {accel}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {lightning.__version__}, {torch.get_num_threads()} torch threads"
    )


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The shell command that reproduces this run (``argv`` None: this process's own arguments)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join([".venv/bin/python", script, *args])


def cell(value: Any, fmt: str) -> str:
    """One Markdown cell: numbers through ``fmt``; None as an en dash; '|' escaped in text."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value).replace("|", "\\|")
    return format(value, fmt)


def markdown_table(columns: Sequence[Column], rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| " + " | ".join(c.header for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c.key), c.format) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(
    out_dir: str | os.PathLike,
    stem: str,
    *,
    title: str,
    columns: Sequence[Column],
    rows: Sequence[Mapping[str, Any]],
    command: str,
    machine: str,
    notes: str = "",
    extra: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``<stem>.md`` (title, notes, table, command, machine) and ``<stem>.json`` (raw rows)."""
    if not rows:
        raise ValueError(f"no rows to write for {stem!r}")
    missing = sorted({c.key for c in columns} - set().union(*(r.keys() for r in rows)))
    if missing:
        raise KeyError(f"{stem}: columns {missing} are in no row")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"## {title}", ""]
    if notes:
        md += [notes, ""]
    md += [markdown_table(columns, rows), "", "Command:", "", "```", command, "```", ""]
    md += [f"Machine: {machine}", ""]
    md_path, json_path = out / f"{stem}.md", out / f"{stem}.json"
    md_path.write_text("\n".join(md))
    payload = {
        "title": title,
        "command": command,
        "machine": machine,
        "columns": [{"key": c.key, "header": c.header, "format": c.format} for c in columns],
        "rows": list(rows),
        **(extra or {}),
    }
    json_path.write_text(json.dumps(payload, indent=2, default=str))
    return md_path, json_path


def read_markdown_table(text: str) -> list[dict[str, str]]:
    """The first pipe table of a Markdown text as header → cell dicts (for checking written files)."""
    lines = [ln.strip() for ln in text.splitlines()]
    start = next((i for i, ln in enumerate(lines) if ln.startswith("|")), None)
    if start is None:
        raise ValueError("no Markdown table found")
    body = []
    for ln in lines[start:]:
        if not ln.startswith("|"):
            break
        body.append([c.strip() for c in ln.strip("|").split(" | ")])
    header, rows = body[0], body[2:]
    return [dict(zip(header, r, strict=True)) for r in rows]
