"""benchmarks/whole_merge_profile.py's table: the library's functions by cumulative time, then torch's
built-ins by their own time, each row with its method label."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_profile_rows_list_library_functions_then_builtins() -> None:
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("whole_merge_profile", BENCH / "whole_merge_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from lightning_merge.stats.patch_gram import sym_gram

    rows = module.profile_rows("x", lambda: sym_gram(torch.randn(64, 900, dtype=torch.float64)), top=3)
    ours = [r for r in rows if not r["function"].startswith("<")]
    builtins = [r for r in rows if r["function"].startswith("<")]
    assert rows == ours + builtins and 1 <= len(ours) <= 3 and len(builtins) == 1
    assert ours[0]["function"].startswith("stats/patch_gram.py:") and "sym_gram" in ours[0]["function"]
    assert [r["cum_s"] for r in ours] == sorted((r["cum_s"] for r in ours), reverse=True)
    assert all(r["method"] == "x" and r["calls"] >= 1 for r in rows)
