"""Launching a two-process DDP test script, and the trainer those scripts use, in one place."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
from trained import quiet_trainer

TESTS = Path(__file__).resolve().parent


def run_ddp_script(
    name: str, out: Path, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``tests/<name>`` writing into ``out``; Lightning launches the second rank itself (with
    the same environment, so ``env`` reaches both ranks).

    ``LOCAL_RANK`` is dropped so a test run that is itself under DDP does not make the script a worker."""
    script = TESTS / name
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, **(env or {}), "PYTHONPATH": path}
    env.pop("LOCAL_RANK", None)
    return subprocess.run(
        [sys.executable, str(script), str(out)], env=env, capture_output=True, text=True, timeout=timeout
    )


def ddp_trainer(*callbacks: pl.Callback) -> pl.Trainer:
    """Two CPU processes (gloo) under Lightning's DDP strategy, otherwise quiet."""
    return quiet_trainer(devices=2, strategy="ddp", callbacks=list(callbacks))
