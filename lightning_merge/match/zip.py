"""ZipIt!'s greedy zip matcher, exact and incremental.

The rule (Stoica et al., 2023, and ``match_tensors_zipit`` in gstoica27/ZipIt) on the N·n × N·n
similarity with its diagonal masked: repeatedly fuse the most similar pair of current features
(from any model, the same one included) until ``target_width`` remain. A fused feature's similarity
to every other feature is the minimum of its parts' similarities, times α when α > 0. With α ≤ 0
the minimum is kept unscaled but the fused feature may never take a feature of a model it already
contains (the official code masks the blocks of both parts' models; for N = 2 a cross-model fusion
is thereby frozen). β caps same-model fusions: every model gets a budget of
``floor(floor((N·n − m) / N) · β)`` fusions of two features whose lowest-index members come from it
(their "origin" model); once it is spent, pairs of features of that origin are masked. A budget of
zero masks them from the start (the paper's "β = 0: no same-model merges"; the official loop would
allow one such fusion before it notices).

Ties: the pair with the lowest flat index in the current matrix wins, i.e. the lowest (row, column)
with features ordered by their lowest member — what ``argmax`` of the published rebuilt matrix picks.

The published loop deletes a row and a column and rescans the whole matrix after every fusion
(O((N·n)³) memory traffic). Here every row caches its best value and first best column: after a
fusion only the fused row and the rows whose best partner was one of the two parts (or was masked
by a spent budget, or whose changed entry reaches their cached best) are rescanned. On a GPU
(``backend="torch"``) the matrix is updated in place (dead features become -inf). On CPU writing a
column costs a cache miss per row, which at N·n = 8192 was 60 % of the time, so the CPU loop
(:mod:`._zip_loop`) never writes one: the input is only read, fused rows are appended and
transposed in blocks, and each row read hides what changed after it. It is compiled with Numba
because in NumPy its per-row calls were most of its time (5 s at n = 4096; 1.3 s compiled, see
benchmarks/results/matchers_profile.md). Both make the same choices as the published rule;
benchmarks/matchers.py times them.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from lightning_merge.match._checks import (
    check_group_size,
    check_similarity,
    check_symmetric,
    check_target_width,
    check_unit_interval,
)
from lightning_merge.match.permute import match_groups
from lightning_merge.match.transform import SpaceTransform, from_assignment

NEG = float("-inf")


def zipit_budget(total: int, target_width: int, num_models: int, beta: float) -> int:
    """Same-model fusions each model may make (the official formula)."""
    return int(((total - target_width) // num_models) * beta + 1e-4)


def check_alpha_beta(alpha: float, beta: float) -> None:
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha > 1.0:
        raise ValueError(f"alpha must be a finite number <= 1 (alpha <= 0 forbids re-fusion), got {alpha!r}")
    check_unit_interval(beta, "beta")


def _stuck(done: int, wanted: int, alpha: float, beta: float) -> ValueError:
    return ValueError(
        f"ZipIt! found no allowed pair after {done} of {wanted} fusions: alpha={alpha} and "
        f"beta={beta} forbid reaching the target width; raise beta or alpha, or the target width"
    )


FLUSH = 16  # fused rows buffered before their transposed copy is written (see _zip_loop)
SCATTER = 16  # a slot row's changed columns are hidden one by one below 1/SCATTER of the width


def _stale_rows(rowmax, rowarg, new, lo: int, hi: int):
    """Rows to rescan: the fused one, those whose best partner changed, and those whose new
    entry reaches their cached best (ties must go to the lowest column; a rescan decides)."""
    rowmax[hi] = NEG
    stale = (rowmax > NEG) & ((rowarg == lo) | (rowarg == hi) | (new >= rowmax))
    stale[lo] = True
    return stale


def _spend(budget: list[int], lo: int, hi: int, n: int, stale, rowmax, rowarg) -> slice | None:
    """Count a same-model fusion; when its origin's budget is spent, return that model's block
    (to be masked) and mark the block's rows whose best partner lies in it stale."""
    origin = lo // n  # the model of a feature's lowest member
    if origin != hi // n:
        return None
    budget[origin] -= 1
    if budget[origin] > 0:
        return None
    block = slice(origin * n, (origin + 1) * n)
    arg = rowarg[block]
    stale[block] |= (rowmax[block] > NEG) & (arg >= block.start) & (arg < block.stop)  # live rows only
    return block


def _absorb(new, contains, lo: int, hi: int, alpha: float) -> None:
    """Scale the fused row by α, or (α <= 0) forbid partners sharing a model with it."""
    if alpha > 0:
        new *= alpha
    else:
        new[(contains & (contains[lo] | contains[hi])) != 0] = NEG
        contains[lo] |= contains[hi]


def _compiled_fusions(
    sim: np.ndarray, num_models: int, target_width: int, alpha: float, beta: float
) -> list[tuple[int, int]]:
    """The greedy loop on CPU, compiled (:mod:`._zip_loop`; ``sim`` is only read)."""
    from lightning_merge.match._zip_loop import greedy_fusions  # Numba's import (~0.4 s) only when used

    total = sim.shape[0]
    wanted = total - target_width
    budget = zipit_budget(total, target_width, num_models, beta)
    out = np.empty((wanted, 2), dtype=np.int64)
    scratch = np.empty((wanted, total)), np.empty((total, wanted))  # NumPy asks for huge pages
    done = greedy_fusions(
        np.ascontiguousarray(sim), num_models, float(alpha), budget, FLUSH, SCATTER, *scratch, out
    )
    if done < wanted:
        raise _stuck(done, wanted, alpha, beta)
    return [(lo, hi) for lo, hi in out.tolist()]


def _eager_fusions(
    sim: torch.Tensor, num_models: int, target_width: int, alpha: float, beta: float
) -> list[tuple[int, int]]:
    """The same loop in torch ops on a working copy whose rows and columns are rewritten in place
    (cheap on a GPU; an independent check of the CPU loop)."""
    total = sim.shape[0]
    n = total // num_models
    s = sim.clone()
    s.fill_diagonal_(NEG)  # keeps every fused row's own entries at -inf below, too
    contains = torch.ones(total, dtype=torch.long, device=s.device) << (
        torch.arange(total, device=s.device) // n
    )
    budget = [zipit_budget(total, target_width, num_models, beta)] * num_models
    if budget[0] <= 0:
        for i in range(num_models):
            s[i * n : (i + 1) * n, i * n : (i + 1) * n] = NEG
    rowarg = s.argmax(1)  # first best column of every row
    rowmax = s.gather(1, rowarg[:, None]).squeeze(1)  # dead or fully masked rows hold -inf
    fusions: list[tuple[int, int]] = []
    wanted = total - target_width
    for done in range(wanted):
        lo = int(rowmax.argmax())
        if float(rowmax[lo]) == NEG:
            raise _stuck(done, wanted, alpha, beta)
        hi = int(rowarg[lo])
        new = torch.minimum(s[lo], s[hi])
        _absorb(new, contains, lo, hi, alpha)
        s[hi] = NEG
        s[:, hi] = NEG
        s[lo] = new
        s[:, lo] = new
        stale = _stale_rows(rowmax, rowarg, new, lo, hi)
        block = _spend(budget, lo, hi, n, stale, rowmax, rowarg)
        if block is not None:
            s[block, block] = NEG
        rows = torch.nonzero(stale).squeeze(1)
        sub = s[rows]
        arg = sub.argmax(1)  # first best column (documented)
        rowarg[rows] = arg
        rowmax[rows] = sub[torch.arange(len(rows), device=s.device), arg]
        fusions.append((lo, hi))
    return fusions


def zipit_fusions(
    sim: torch.Tensor,
    num_models: int,
    target_width: int,
    alpha: float,
    beta: float,
    *,
    backend: Literal["auto", "torch", "numpy"] = "auto",
) -> list[tuple[int, int]]:
    """The greedy fusions ``(lo, hi)`` in order, each named by the parts' lowest member index.

    ``sim`` must be a validated symmetric float64 matrix; it is not modified. ``"numpy"`` (the
    ``"auto"`` choice on CPU) runs the compiled column-write-free loop on a NumPy view; ``"torch"``
    the in-place loop on ``sim``'s device. Both make the same choices.
    """
    if backend not in ("auto", "torch", "numpy"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'numpy', got {backend!r}")
    on_cpu = sim.device.type == "cpu"
    if backend == "numpy" and not on_cpu:
        raise ValueError(f"backend='numpy' needs a CPU matrix, got one on {sim.device}")
    if backend == "torch" or not on_cpu:
        return _eager_fusions(sim, num_models, target_width, alpha, beta)
    return _compiled_fusions(sim.contiguous().numpy(), num_models, target_width, alpha, beta)


def assignment_from_fusions(fusions: list[tuple[int, int]], total: int, device: torch.device) -> torch.Tensor:
    """Merged index of every source feature: surviving features in order of their lowest member."""
    owner = list(range(total))
    for lo, hi in reversed(fusions):  # the last fusion's survivor is final; resolve backwards
        owner[hi] = owner[lo]
    owner_t = torch.tensor(owner, device=device)
    reps = torch.unique(owner_t)  # sorted
    return torch.searchsorted(reps, owner_t)


def _zip_groups(
    sim: torch.Tensor, num_models: int, group_size: int, target_width: int, alpha: float, beta: float
) -> torch.Tensor:
    """Align whole groups to model 0's first, then zip within each aligned tuple of groups."""
    n = sim.shape[0] // num_models
    groups = n // group_size
    per_group = target_width // groups
    members = [torch.arange(groups)[:, None] * group_size + torch.arange(group_size)]  # (G, g)
    for i in range(1, num_models):
        cross = sim[:n, i * n : (i + 1) * n]
        group_cols, _ = match_groups(cross, group_size)
        members.append(i * n + members[0][torch.from_numpy(group_cols)])
    assign = torch.empty(sim.shape[0], dtype=torch.long, device=sim.device)
    for t in range(groups):
        idx = torch.cat([m[t] for m in members]).to(sim.device)
        sub = sim[idx][:, idx]
        fus = zipit_fusions(sub, num_models, per_group, alpha, beta)
        assign[idx] = t * per_group + assignment_from_fusions(fus, idx.numel(), sim.device)
    return assign


def match_zipit(
    corr: torch.Tensor,
    num_models: int,
    *,
    alpha: float = 0.3,
    beta: float = 0.125,
    target_width: int | None = None,
    group_size: int = 1,
) -> SpaceTransform:
    """ZipIt! on a correlation (or any symmetric similarity) matrix → merge/unmerge of width m.

    ``target_width`` m in [n, N·n] (default n: a full merge). ``group_size > 1`` (attention heads,
    GroupNorm groups) first aligns whole groups of every model to model 0's (Hungarian on the mean
    of the best within-group assignment, as MuDSC does) and then zips each aligned tuple of groups
    down to m / (n / group_size) features, so every merged group comes from one group per model.
    """
    sim = check_symmetric(check_similarity(corr, num_models))
    total = sim.shape[0]
    n = total // num_models
    m = n if target_width is None else target_width
    check_target_width(m, n, num_models)
    check_alpha_beta(alpha, beta)
    check_group_size(group_size, n)
    if group_size == 1:
        assign = assignment_from_fusions(zipit_fusions(sim, num_models, m, alpha, beta), total, sim.device)
    else:
        groups = n // group_size
        if m % groups:
            raise ValueError(
                f"target_width={m} must be a multiple of the number of groups {groups} "
                f"(n={n}, group_size={group_size}) to keep groups intact"
            )
        assign = _zip_groups(sim, num_models, group_size, m, alpha, beta)
    return from_assignment(assign, m, num_models)
