"""The merge config docs/own_models.md and the README show is the runnable one in examples/own_models."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "own_models"


def yaml_blocks(path: Path) -> list[dict]:
    return [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", path.read_text(), flags=re.S)]


def test_the_docs_merge_config_is_the_example_projects() -> None:
    example = yaml.safe_load((EXAMPLE / "merge.yaml").read_text())
    assert yaml_blocks(REPO / "docs" / "own_models.md")[0] == example
    readme = [
        b for b in yaml_blocks(REPO / "README.md") if "sources" in b.get("model", {}).get("init_args", {})
    ]
    assert readme[0]["model"] == example["model"]


def test_the_example_project_has_what_the_commands_name() -> None:
    """`python -m my_project.cli fit --config train_a.yaml`, `python train_plain.py` and the classes the
    configs name exist, and the checkpoints they write are the merge config's sources."""
    train_a = yaml.safe_load((EXAMPLE / "train_a.yaml").read_text())
    sources = yaml.safe_load((EXAMPLE / "merge.yaml").read_text())["model"]["init_args"]["sources"]
    assert [s["path"] for s in sources] == ["ckpts/a.ckpt", "ckpts/b.ckpt"]
    callback = train_a["trainer"]["callbacks"][0]["init_args"]
    assert (callback["dirpath"], callback["filename"]) == ("ckpts", "a")
    assert 'dirpath="ckpts", filename="b"' in (EXAMPLE / "train_plain.py").read_text()
    for module in ("cli", "models", "data"):
        assert (EXAMPLE / "my_project" / f"{module}.py").is_file()
