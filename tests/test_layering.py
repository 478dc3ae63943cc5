"""The package's import layering: every module imports only from the layers below its own.

data passes ← graph ← stats / match ← apply ← methods ← data ← models ← evaluation / reporting ←
pipeline / callbacks ← module ← cli. Entry points (``__main__.py``, the top ``__init__.py``) may
import anything. Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_merge"
LAYERS: list[tuple[str, ...]] = [
    ("dataflow", "cost"),
    ("graph",),
    ("stats", "match"),
    ("apply",),
    ("methods",),
    ("data",),
    ("models",),
    ("evaluation", "reporting"),
    ("pipeline", "callbacks"),
    ("module",),
    ("cli",),
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}


def _top(module: str) -> str:
    return module.split(".")[1]


def _package_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute ``lightning_merge.X`` import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.startswith("lightning_merge.")]
    return found


def _layered_files() -> list[Path]:
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__main__.py"]
    return [p for p in files if p != PACKAGE / "__init__.py"]


def test_every_package_module_has_a_layer() -> None:
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _layered_files()}
    assert tops <= set(LEVEL), f"modules without a layer: {sorted(tops - set(LEVEL))}"


@pytest.mark.parametrize("path", _layered_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_go_down(path: Path) -> None:
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    bad = [
        f"line {line}: {module}"
        for line, module in _package_imports(path)
        if _top(module) != own and LEVEL[_top(module)] >= LEVEL[own]
    ]
    assert not bad, (
        f"{path.relative_to(PACKAGE)} (layer {own!r}) imports from its own or a higher layer: {bad}"
    )


def test_the_check_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from lightning_merge.module import MergeModule\n")
    assert _package_imports(bad) == [(2, "lightning_merge.module")]
