"""Input validation shared by the matchers: every error names the argument and the bad value."""

from __future__ import annotations

import math

import torch


def check_num_models(num_models: int) -> None:
    if not isinstance(num_models, int) or isinstance(num_models, bool) or num_models < 2:
        raise ValueError(f"num_models must be an integer >= 2, got {num_models!r}")


def check_similarity(sim: torch.Tensor, num_models: int, *, name: str = "corr") -> torch.Tensor:
    """Validate an (N·n × N·n) similarity matrix and return it as float64 on its own device."""
    if not isinstance(sim, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(sim).__name__}")
    check_num_models(num_models)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(sim.shape)}")
    total = sim.shape[0]
    if total == 0 or total % num_models:
        raise ValueError(f"{name} has {total} rows, which is not N·n for N={num_models} models (n >= 1)")
    sim = sim.to(torch.float64)
    bad = ~torch.isfinite(sim)
    if bool(bad.any()):
        r, c = (int(v) for v in torch.nonzero(bad)[0])
        raise ValueError(f"{name} has a non-finite entry {sim[r, c].item()} at ({r}, {c})")
    return sim


def check_symmetric(sim: torch.Tensor, *, name: str = "corr", tol: float = 1e-9) -> torch.Tensor:
    """Greedy pair rules read a pair's score from one triangle: reject asymmetric input."""
    gap = (sim - sim.T).abs()
    worst = float(gap.max())
    if worst > tol * max(1.0, float(sim.abs().max())):
        r, c = (int(v) for v in torch.nonzero(gap == gap.max())[0])
        raise ValueError(f"{name} must be symmetric; entries ({r}, {c}) and ({c}, {r}) differ by {worst:.3g}")
    return (sim + sim.T) / 2


def check_group_size(group_size: int, width: int, *, where: str = "group_size") -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"{where} must be a positive integer, got {group_size!r}")
    if width % group_size:
        raise ValueError(f"{where}={group_size} does not divide the per-model width n={width}")


def check_target_width(target_width: int, width: int, num_models: int) -> None:
    lo, hi = width, width * num_models
    if not isinstance(target_width, int) or isinstance(target_width, bool):
        raise TypeError(f"target_width must be an int, got {type(target_width).__name__}")
    if not lo <= target_width <= hi:
        raise ValueError(
            f"target_width={target_width} is outside [n, N·n] = [{lo}, {hi}] (n={width}, N={num_models})"
        )


def check_unit_interval(value: float, name: str) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
