"""Self-check of a merge graph: permuting every space of one model must not change its outputs.

A wrong graph (a missing member, a residual stream split in two, heads cut apart) makes the
permuted model compute something else, so ``check_equivalence`` catches it on random data.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .errors import EquivalenceError
from .spec import MergeGraph, Space

MergeTwin = Callable[[nn.Module, MergeGraph, Mapping[str, torch.Tensor]], nn.Module]


def random_permutation(space: Space, generator: torch.Generator) -> torch.Tensor:
    """A permutation of ``space.size`` features that moves whole groups and shuffles inside each."""
    g = space.group_size
    n_groups = space.size // g
    groups = torch.randperm(n_groups, generator=generator)
    within = torch.argsort(torch.rand(n_groups, g, generator=generator), dim=1)
    return (groups.view(-1, 1) * g + within).reshape(-1)


def random_permutations(graph: MergeGraph, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {s.name: random_permutation(s, gen) for s in graph.spaces}


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    return named


@torch.no_grad()
def permute_model(model: nn.Module, graph: MergeGraph, perms: Mapping[str, torch.Tensor]) -> nn.Module:
    """Apply ``perms[space]`` to every member axis in place: new feature f = old feature perm[f].

    Producers ("out") and consumers ("in") use the same gather of axis positions, so a correct
    graph leaves the function computed by the model unchanged. Each (tensor, axis) is gathered
    once, with the positions of all its spaces.
    """
    tensors = _tensors(model)
    plans: dict[tuple[str, int], torch.Tensor] = {}
    for space in graph.spaces:
        if space.name not in perms:
            continue
        perm = torch.as_tensor(perms[space.name], dtype=torch.long)
        if perm.shape != (space.size,):
            raise ValueError(
                f"permutation for {space.name!r} has shape {tuple(perm.shape)}, expected ({space.size},)"
            )
        for ref in space.members:
            if ref.param not in tensors:
                raise KeyError(f"merge point {space.name!r}: model has no parameter or buffer {ref.param!r}")
            t = tensors[ref.param]
            pos = ref.positions(space.size)
            if ref.axis >= t.dim() or int(pos.max()) >= t.shape[ref.axis]:
                raise ValueError(
                    f"merge point {space.name!r}: {ref.param} axis {ref.axis} (shape {tuple(t.shape)}) "
                    f"cannot hold positions up to {int(pos.max())}"
                )
            index = plans.setdefault((ref.param, ref.axis), torch.arange(t.shape[ref.axis]))
            index[pos.reshape(-1)] = pos[perm].reshape(-1)
    for (name, axis), index in plans.items():
        t = tensors[name]
        t.copy_(t.index_select(axis, index.to(t.device)))
    return model


@torch.no_grad()
def randomize_constants(model: nn.Module, seed: int = 0) -> None:
    """Redraw float tensors whose entries are all equal (fresh BN stats, LN weights, zero biases).

    A constant tensor looks the same under any permutation, so a graph that forgot it would pass.
    A constant c != 0 becomes c·U(0.5, 1.5) (variances stay positive), zeros become N(0, 0.1²):
    the scale of the activations is kept, so the input still drives the output.
    """
    gen = torch.Generator().manual_seed(seed)
    for t in _tensors(model).values():
        if not (t.is_floating_point() and t.numel() > 1 and _is_constant(t)):
            continue
        c = t.reshape(-1)[0].item()
        if c == 0:
            t.copy_(0.1 * torch.randn(t.shape, generator=gen, dtype=t.dtype))
        else:
            t.copy_(c * (0.5 + torch.rand(t.shape, generator=gen, dtype=t.dtype)))


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Set BatchNorm running statistics to those of ``x`` so eval-mode activations keep their scale.

    With fresh statistics (mean 0, var 1) the signal of a deep random net fades into the biases and
    a permutation error barely moves the output. Skipped when ``x`` is too small for batch stats.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    norms = [m for m in norms if m.track_running_stats]
    if not norms:
        return
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone()) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch gives exactly its statistics
        m.train()
    try:
        model(x)
    except ValueError:  # e.g. one value per channel: keep the previous statistics
        for m, (_, mean, var) in zip(norms, saved, strict=True):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
    for m, (momentum, _, _) in zip(norms, saved, strict=True):
        m.momentum = momentum
        m.eval()


def _is_constant(t: torch.Tensor) -> bool:
    lo, hi = torch.aminmax(t)
    return bool(lo == hi)


def _outputs(out: object, prefix: str = "output") -> dict[str, torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return {prefix: out}
    if isinstance(out, Mapping):
        return {k: v for key, val in out.items() for k, v in _outputs(val, f"{prefix}[{key!r}]").items()}
    if isinstance(out, (tuple, list)):
        return {k: v for i, val in enumerate(out) for k, v in _outputs(val, f"{prefix}[{i}]").items()}
    return {}


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    worst, worst_name = 0.0, ""
    for name, out in a.items():
        if not out.is_floating_point():
            continue
        scale = out.abs().max().clamp_min(torch.finfo(out.dtype).tiny)
        err = float((out - b[name]).abs().max() / scale)
        if not err < float("inf") or err >= worst:  # NaN counts as the worst
            worst, worst_name = err if err == err else float("inf"), name
    return worst, worst_name


def check_equivalence(
    model: nn.Module,
    graph: MergeGraph,
    example_input: torch.Tensor,
    *,
    seed: int = 0,
    rtol: float = 1e-5,
    randomize: bool = True,
    merge: MergeTwin | None = None,
) -> float:
    """Permute every space of a float64 copy of ``model``; return the worst max|Δ| / max|out|.

    Raises :class:`EquivalenceError` naming the worst output when it exceeds ``rtol``. With
    ``randomize`` (in the copy only) constant tensors are redrawn and BatchNorm statistics are set
    from ``example_input``, so that a forgotten member cannot hide behind a constant. ``merge``
    (``merge(model, graph, perms)``, e.g. :func:`lightning_merge.apply.twin.merged_twin`, which the
    full check :func:`lightning_merge.apply.twin.check_equivalence` passes) merges the model with its
    permuted copy through the true permutations, which must give the model back: this checks the roles
    and layouts the merge reads, which a permutation alone cannot see.
    """
    work = copy.deepcopy(model).double().eval()
    x = example_input.double() if example_input.is_floating_point() else example_input
    if randomize:
        randomize_constants(work, seed)
        calibrate_batchnorm(work, x)
    perms = random_permutations(graph, seed)
    with torch.no_grad():
        a = _outputs(work(x))
        merged = _outputs(merge(work, graph, perms)(x)) if merge is not None else a
        b = _outputs(permute_model(work, graph, perms)(x))
    worst, worst_name = _worst(a, b)
    if worst > rtol:
        raise EquivalenceError(
            f"permuting the merge points changed {worst_name}: max|Δ|/max|out| = {worst:.3g} > {rtol:g}; "
            "a space misses a member or joins axes that must differ"
        )
    merge_err, merge_name = _worst(a, merged)
    if merge_err > rtol:
        raise EquivalenceError(
            f"merging the model with its permuted copy through the true permutations changed "
            f"{merge_name}: max|Δ|/max|out| = {merge_err:.3g} > {rtol:g}; the merge reads a member's "
            "role or axis layout differently from the permutation"
        )
    return max(worst, merge_err)
