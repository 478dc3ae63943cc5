"""ZipIt!'s greedy loop on CPU, compiled with Numba (the CPU path of :func:`~.zip.zipit_fusions`).

Same rule, cache and tie order as the in-place torch loop in zip.py, but the matrix is never
written: rewriting a fused feature's column touches one cache line per row, which at N·n = 8192
was most of the time. The input ``sim`` is only read; fusion k appends the fused feature's row to
``fused[k]`` (slot k), and entry (r, c) is right in the row of whichever of r, c was written last
(``ver``: -1 for an input row, its latest slot, or DEAD). So row r is its own row (input or latest
slot) at the columns not written since, plus the live slots newer than it, read at r from
``fused_t`` (the slots transposed in blocks of ``flush``; the newest few straight from ``fused``).
Dead features and spent β blocks are hidden on read. Every entry is the very float the in-place
loop holds, so every max, first best column and tie is the same.
"""

from __future__ import annotations

import numpy as np
from numba import njit

NEG = -np.inf
DEAD = np.iinfo(np.int64).max  # version of an absorbed feature: newer than every row
Arr = np.ndarray  # the loop's arguments are NumPy arrays and scalars (Numba ignores the hints)


@njit(cache=True, nogil=True)
def _scan(src: Arr, ver: Arr, vr: int, start: int, stop: int, best: float, arg: int) -> tuple[float, int]:
    """First max of ``src[c]`` over c in [start, stop) not written after version ``vr``. The
    version is only looked at for a candidate above the best so far: a rare, well-predicted
    branch, so the loop runs at memory speed."""
    for c in range(start, stop):
        v = src[c]
        if v > best and ver[c] <= vr:
            best, arg = v, c
    return best, arg


@njit(cache=True, nogil=True)
def _scan_newer(
    trow: Arr,
    first: int,
    stop: int,
    slot_feat: Arr,
    slot_live: Arr,
    skip_lo: int,
    skip_hi: int,
    best: float,
    arg: int,
) -> tuple[float, int]:
    """Fold slots [first, stop) of one row of the transposed store into (best, arg); slots are not
    in column order, so a tie goes to the lower column."""
    for k in range(first, stop):
        v = trow[k]
        if v >= best and slot_live[k]:
            c = slot_feat[k]
            if (v > best or c < arg) and not (skip_lo <= c < skip_hi):
                best, arg = v, c
    return best, arg


@njit(cache=True, nogil=True)
def _row_best(r: int, st: tuple, n: int, count: int, flushed: int) -> tuple[float, int]:
    """Max and first best column of the current row ``r`` (-inf and -1 when all is hidden)."""
    sim, fused, fused_t, ver, slot_feat, slot_live, spent, _ = st
    total = sim.shape[0]
    vr = ver[r]
    b = r // n
    skip_lo, skip_hi = (b * n, (b + 1) * n) if spent[b] else (r, r + 1)  # diagonal or spent block
    src = sim[r] if vr < 0 else fused[vr]
    best, arg = _scan(src, ver, vr, 0, skip_lo, NEG, -1)
    best, arg = _scan(src, ver, vr, skip_hi, total, best, arg)
    slots = (slot_feat, slot_live, skip_lo, skip_hi)
    best, arg = _scan_newer(fused_t[r], vr + 1, flushed, *slots, best, arg)  # flushed: transposed
    return _scan_newer(fused[:, r], max(vr + 1, flushed), count, *slots, best, arg)  # the newest


@njit(cache=True, nogil=True)
def _row(r: int, st: tuple, n: int, count: int, flushed: int, scatter: int, out: Arr) -> None:
    """The current row ``r`` in full into ``out`` (hidden entries at -inf). A slot row's columns
    written since are hidden one by one when they are fewer than 1/``scatter`` of the width."""
    sim, fused, fused_t, ver, slot_feat, slot_live, spent, touched = st
    vr = ver[r]
    if vr >= 0 and scatter * 2 * (count - vr - 1) < len(out):
        out[:] = fused[vr]
        for i in range(2 * vr + 2, 2 * count):
            out[touched[i]] = NEG
    else:
        src = sim[r] if vr < 0 else fused[vr]
        for c in range(len(out)):
            out[c] = src[c] if ver[c] <= vr else NEG
    for k in range(vr + 1, count):
        if slot_live[k]:
            out[slot_feat[k]] = fused_t[r, k] if k < flushed else fused[k, r]
    out[r] = NEG
    b = r // n
    if spent[b]:
        out[b * n : (b + 1) * n] = NEG


@njit(cache=True, nogil=True)
def _fused_row(
    lo: int,
    hi: int,
    st: tuple,
    n: int,
    count: int,
    flushed: int,
    scatter: int,
    alpha: float,
    contains: Arr,
    a: Arr,
    new: Arr,
) -> None:
    """The row of lo ∪ hi: the minimum of both rows, times α (α > 0) or with every partner that
    shares a model with it hidden (α <= 0)."""
    _row(lo, st, n, count, flushed, scatter, a)
    _row(hi, st, n, count, flushed, scatter, new)
    np.minimum(a, new, new)
    if alpha > 0:
        new *= alpha
    else:
        both = contains[lo] | contains[hi]
        for c in range(len(new)):
            if contains[c] & both:
                new[c] = NEG
        contains[lo] = both


@njit(cache=True, nogil=True)
def _mark_stale(rowmax: Arr, rowarg: Arr, new: Arr, lo: int, hi: int, stale: Arr) -> None:
    """Update every row's cached best for the new entries at ``lo`` (``hi`` is gone) and mark the
    rows that need a rescan: the fused one and those whose best partner was a part and is not
    beaten by the new entry. A new entry above the cached best is the new best; one equal to it
    moves the first best column to lo if lo is lower."""
    rowmax[hi] = NEG
    for r in range(len(rowmax)):
        top = rowmax[r]
        stale[r] = False
        if top == NEG:  # dead, or every partner hidden for good
            continue
        if new[r] > top:
            rowmax[r], rowarg[r] = new[r], lo
        elif rowarg[r] == lo or rowarg[r] == hi:
            stale[r] = True
        elif new[r] == top and lo < rowarg[r]:
            rowarg[r] = lo
    stale[lo] = True


@njit(cache=True, nogil=True)
def _spend(lo: int, hi: int, n: int, budget: Arr, spent: Arr, rowmax: Arr, rowarg: Arr, stale: Arr) -> None:
    """Count a same-model fusion; once its origin's budget is spent, mask that model's block and
    rescan the block's rows whose best partner lies in it."""
    origin = lo // n  # the model of a feature's lowest member
    if origin != hi // n:
        return
    budget[origin] -= 1
    if budget[origin] > 0:
        return
    spent[origin] = True
    start, stop = origin * n, (origin + 1) * n
    for r in range(start, stop):
        if rowmax[r] > NEG and start <= rowarg[r] < stop:
            stale[r] = True


@njit(cache=True, nogil=True)
def _transpose(fused: Arr, fused_t: Arr, ver: Arr, first: int, count: int) -> None:
    """Copy slots [first, count) into the columns of ``fused_t`` at every live feature's row (a
    dead feature's row is never read again)."""
    for r in range(fused.shape[1]):
        if ver[r] != DEAD:
            for k in range(first, count):
                fused_t[r, k] = fused[k, r]


@njit(cache=True, nogil=True)
def greedy_fusions(
    sim: Arr,
    num_models: int,
    alpha: float,
    budget0: int,
    flush: int,
    scatter: int,
    fused: Arr,
    fused_t: Arr,
    out: Arr,
) -> int:
    """Run the greedy loop for up to ``wanted = len(out)`` fusions into ``out`` (lo, hi per row);
    return how many were made (fewer when no allowed pair is left). ``fused`` (wanted × N·n) and
    ``fused_t`` (N·n × wanted) are scratch, allocated by the caller (NumPy asks for huge pages)."""
    total = sim.shape[0]
    n = total // num_models
    wanted = len(out)
    ver = np.full(total, -1, dtype=np.int64)
    slot_feat = np.empty(wanted, dtype=np.int64)
    slot_live = np.zeros(wanted, dtype=np.bool_)
    budget = np.full(num_models, budget0, dtype=np.int64)
    spent = budget <= 0
    touched = np.empty(2 * wanted, dtype=np.int64)  # the fused and the absorbed feature of every step
    a, new = np.empty(total), np.empty(total)
    st = (sim, fused, fused_t, ver, slot_feat, slot_live, spent, touched)
    contains = np.ones(total, dtype=np.int64) << (np.arange(total) // n)
    rowmax, rowarg = np.empty(total), np.empty(total, dtype=np.int64)
    stale = np.zeros(total, dtype=np.bool_)
    for r in range(total if wanted else 0):
        rowmax[r], rowarg[r] = _row_best(r, st, n, 0, 0)
    flushed = 0
    for done in range(wanted):
        lo = np.argmax(rowmax)  # first row holding the global max ...
        if rowmax[lo] == NEG:
            return done
        hi = rowarg[lo]  # ... and its first best column (> lo by symmetry)
        _fused_row(lo, hi, st, n, done, flushed, scatter, alpha, contains, a, new)
        _mark_stale(rowmax, rowarg, new, lo, hi, stale)
        _spend(lo, hi, n, budget, spent, rowmax, rowarg, stale)
        for f in (lo, hi):
            if ver[f] >= 0:
                slot_live[ver[f]] = False
        fused[done] = new
        slot_feat[done], slot_live[done] = lo, True
        ver[lo], ver[hi] = done, DEAD
        touched[2 * done], touched[2 * done + 1] = lo, hi
        out[done, 0], out[done, 1] = lo, hi
        for r in np.flatnonzero(stale):
            rowmax[r], rowarg[r] = _row_best(r, st, n, done + 1, flushed)
        if done + 1 - flushed == flush:
            _transpose(fused, fused_t, ver, flushed, done + 1)
            flushed = done + 1
    return wanted
