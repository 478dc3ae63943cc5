"""PLeaS' published refit, from statistics: per layer, independent, one solve per output block.

PLeaS (Nasery et al.; SewoongLab/PLeaS-Merging ``get_model_orig_activations``) fits every merged
Linear / Conv2d on the *source models' own* activations at that layer: its inputs are
[ (x_A,m + x_B,m)/2 , x_A,u , x_B,u ] (matched pairs averaged, unmatched features of each model kept
apart) and its targets the sources' outputs y_i = W_i x_i + b_i arranged the same way. That is the
merge matrix M of each merge point applied to the concatenated source features, on the input axis
and on the output axis (fixed axes, such as the image channels or a head's classes, are averaged).
So with z = [x_1; …; x_N] (:mod:`lightning_merge.stats.joint_inputs`),

    X = P z,   Y = Σ_i Q_i (W_i z_i + b_i),   XᵀX = P G Pᵀ,   YXᵀ = Q̃ G Pᵀ   (G = Σ z zᵀ, augmented by 1)

and the fit needs no data pass. Structure: a merged feature is *owned* by the models feeding it (a
matched one by both, an unmatched one by its model). Weight (o, j) may be non-zero only when o's and
j's owners intersect, so A's unmatched inputs never reach B's unmatched outputs (and B→A): at merged
width 2n the layer is exactly the two sources side by side. Rows with the same owners share their
allowed inputs, so each such output block is one ridge solve over its allowed columns (plus the bias).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_merge.apply.weights import _Member, plan_axis
from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match.transform import SpaceTransform
from lightning_merge.stats.attention import in_proj_view
from lightning_merge.stats.container import FeatureMoments


def axis_maps(
    graph: MergeGraph,
    param: str,
    axis: int,
    length: int,
    transforms: Mapping[str, SpaceTransform],
    num_models: int,
) -> torch.Tensor:
    """(N, L', L) float64: merged axis positions as linear maps of each source's L positions.

    A merge point's segment gets M_i (matched features averaged, unmatched kept); positions in no
    merge point are averaged over the models (1/N each), as the merged weights average them."""
    refs = [(s.name, r) for s in graph.spaces for r in s.members if r.param == param and r.axis == axis]
    members = [_Member(n, r, transforms[n].source_width, transforms[n].width) for n, r in refs]
    plan = plan_axis(length, members, where=f"{param!r} axis {axis}")
    out = torch.zeros(num_models, plan.new_length, length, dtype=torch.float64)
    out[:, plan.fixed_new.long(), plan.fixed_old.long()] = 1.0 / num_models
    for mem, new_ref in zip(plan.members, plan.new_refs, strict=True):
        blocks = torch.stack([transforms[mem.space].merge_block(i) for i in range(num_models)])
        old = mem.ref.positions(mem.n)  # (n, K)
        new = new_ref.positions(mem.m)  # (m, K)
        k = old.shape[1]
        rows = new[:, None, :].expand(mem.m, mem.n, k)
        cols = old[None, :, :].expand(mem.m, mem.n, k)
        vals = blocks.detach().to("cpu", torch.float64)[..., None].expand(-1, -1, -1, k)
        out[:, rows, cols] = vals
    return out


def _kernel_size(layer: nn.Module) -> int:
    """Input positions per channel in a weight row: a conv's kernel (rows c·K + p), 1 for a Linear."""
    return layer.weight[0, 0].numel() if isinstance(layer, nn.Conv2d) else 1


def _map_rows(maps: torch.Tensor, k: int, z: torch.Tensor) -> torch.Tensor:
    """Σ_i (M_i ⊗ I_k) z_i for z = [z_1; …; z_N] stacked by model (rows c·k + p in each): the merged
    layer's rows (C'·k, m). A merge matrix has a few entries per row, so adding the rows they weight
    replaces a dense (C'·k × N·C·k) map, whose product with an N·C·k-wide Gram cost ~C'·k/2 times
    more flops (3.8× the time of the whole system at 256 channels, 3×3; more when wider)."""
    num, c_new, c_old = maps.shape
    zs = z.reshape(num, c_old, -1)
    out = z.new_zeros(c_new, zs.shape[2])
    for i in range(num):  # a merge matrix has a few entries per row: add the rows it weights
        rows, cols = maps[i].nonzero(as_tuple=True)
        out.index_add_(0, rows, zs[i].index_select(0, cols).mul_(maps[i, rows, cols][:, None]))
    return out.reshape(c_new * k, -1)


@dataclass(frozen=True)
class LayerSystem:
    """The augmented normal equations of one merged layer and which weights may be non-zero."""

    xx: torch.Tensor  # (d' [+1], d' [+1])
    yx: torch.Tensor  # (o', d' [+1])
    allowed: torch.Tensor  # (o', d') bool: weight entries outside the structural zero blocks
    bias: bool


def layer_system(
    name: str,
    layers: Sequence[nn.Module],
    moments: FeatureMoments,
    in_maps: torch.Tensor,
    out_maps: torch.Tensor,
) -> LayerSystem:
    """Normal equations of merged layer ``name`` from the joint input moments of its sources' ``layers``."""
    num, dev, k = len(layers), moments.outer.device, _kernel_size(layers[0])
    p, q = in_maps.to(dev), out_maps.to(dev)  # (N, C', C), (N, o', o)
    d = p.shape[2] * k
    if moments.outer.shape[0] != num * d:
        raise ValueError(
            f"joint input moments of {name!r} have width {moments.outer.shape[0]}, expected "
            f"{num} models × {d} inputs: gathered for other models"
        )
    weights = [m.weight.detach().to(dev, torch.float64).reshape(m.weight.shape[0], -1) for m in layers]
    ymap = torch.cat([q[i] @ weights[i] for i in range(num)], 1)  # Y = ymap · z (+ c)
    pg = _map_rows(p, k, moments.outer)  # P G: (d', N·d)
    xx, yx = _map_rows(p, k, pg.T.contiguous()), ymap @ pg.T  # P G Pᵀ, Ỹ G Pᵀ
    bias = layers[0].bias is not None
    if bias:  # augment by the constant-1 input: [[P G Pᵀ, P t], [(P t)ᵀ, n]]
        c = sum(q[i] @ m.bias.detach().to(dev, torch.float64) for i, m in enumerate(layers))
        pt, n = _map_rows(p, k, moments.total[:, None]), moments.count.reshape(1, 1)
        xx = torch.cat([torch.cat([xx, pt], 1), torch.cat([pt.T, n], 1)])
        yx = torch.cat([yx + c[:, None] * pt.T, (ymap @ moments.total + c * moments.count)[:, None]], 1)
    owners_in = (p.abs().sum(-1) > 0).repeat_interleave(k, dim=1)  # (N, d')
    owners_out = q.abs().sum(-1) > 0  # (N, o')
    allowed = (owners_out[:, :, None] & owners_in[:, None, :]).any(0)
    return LayerSystem(xx=xx, yx=yx, allowed=allowed, bias=bias)


def _ridge_solve(xx: torch.Tensor, rhs: torch.Tensor, reg: float) -> torch.Tensor:
    """(xx + reg·I)⁻¹ rhs; with reg = 0 the pseudo-inverse (exact on the data's span when xx is singular)."""
    if reg > 0:  # xx + reg·I is positive definite: Cholesky (half LU's work), LU if rounding says not
        a = xx.clone()
        a.diagonal().add_(reg)
        chol, info = torch.linalg.cholesky_ex(a)
        return torch.cholesky_solve(rhs, chol) if int(info) == 0 else torch.linalg.solve(a, rhs)
    vals, vecs = torch.linalg.eigh(xx)
    keep = vals > vals.abs().max().clamp_min(1e-300) * 1e-12
    inv = torch.where(keep, 1.0 / torch.where(keep, vals, torch.ones_like(vals)), torch.zeros_like(vals))
    return vecs @ (inv[:, None] * (vecs.T @ rhs))


def solve_blocks(system: LayerSystem, ridge: float) -> torch.Tensor:
    """(o', d' [+1]) solution with the structural zeros held: one solve per group of output rows
    with the same allowed inputs; ridge relative to the mean diagonal of the augmented Gram."""
    xx, yx = system.xx, system.yx
    allowed = system.allowed
    if system.bias:
        allowed = torch.cat([allowed, allowed.new_ones(allowed.shape[0], 1)], 1)
    reg = ridge * float(xx.diagonal().mean().clamp_min(1e-12))
    sol = torch.zeros_like(yx)
    patterns, group = torch.unique(allowed, dim=0, return_inverse=True)
    for g, cols in enumerate(patterns):
        rows = torch.nonzero(group == g).flatten()
        idx = torch.nonzero(cols).flatten()
        sub = xx if len(idx) == len(xx) else xx[idx[:, None], idx[None, :]]
        block = _ridge_solve(sub, yx[rows][:, idx].T, reg)  # (|A|, |R|)
        sol[rows[:, None], idx[None, :]] = block.T
    return sol


def refit_from_statistics(
    merged: nn.Module,
    sources: Sequence[nn.Module],
    graph: MergeGraph,
    transforms: Mapping[str, SpaceTransform],
    joint_inputs: Mapping[str, FeatureMoments],
    *,
    ridge: float = 1e-4,
) -> dict[str, tuple[int, int, float]]:
    """Refit every merged Linear / ungrouped Conv2d that has joint input moments (in place).

    Returns per layer (non-zero weights allowed, a source layer's weights, rows seen): PLeaS' cost
    counts only the allowed weights. Layers without moments (or never called) keep their merged weights.
    A self-attention's packed in_proj is refitted too, under the name ``<attention>.in_proj``."""
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    num = len(sources)
    cost: dict[str, tuple[int, int, float]] = {}
    for name, layer in merged.named_modules():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)) or name not in joint_inputs:
            continue
        moments = joint_inputs[name]
        if float(moments.count) == 0:
            continue
        src = sources[0].get_submodule(name)
        in_maps = axis_maps(graph, f"{name}.weight", 1, src.weight.shape[1], transforms, num)
        out_maps = axis_maps(graph, f"{name}.weight", 0, src.weight.shape[0], transforms, num)
        system = layer_system(name, [s.get_submodule(name) for s in sources], moments, in_maps, out_maps)
        sol = solve_blocks(system, ridge)
        _write(layer, name, sol, system.bias)
        cost[name] = (int(system.allowed.sum()), src.weight.numel(), float(moments.count))
    for name, mha in merged.named_modules():
        if isinstance(mha, nn.MultiheadAttention) and f"{name}.in_proj" in joint_inputs:
            cost.update(_refit_in_proj(name, mha, sources, graph, transforms, joint_inputs, ridge))
    return cost


def _refit_in_proj(
    name: str,
    mha: nn.MultiheadAttention,
    sources: Sequence[nn.Module],
    graph: MergeGraph,
    transforms: Mapping[str, SpaceTransform],
    joint_inputs: Mapping[str, FeatureMoments],
    ridge: float,
) -> dict[str, tuple[int, int, float]]:
    """The packed q/k/v projection of a self-attention, fitted like a Linear(E, 3E) (its out_proj is
    an ordinary Linear with its own joint moments)."""
    key, moments = f"{name}.in_proj", joint_inputs[f"{name}.in_proj"]
    if float(moments.count) == 0:
        return {}
    views = [in_proj_view(s.get_submodule(name)) for s in sources]
    e, num = mha.embed_dim, len(sources)
    in_maps = axis_maps(graph, f"{name}.in_proj_weight", 1, e, transforms, num)
    out_maps = axis_maps(graph, f"{name}.in_proj_weight", 0, 3 * e, transforms, num)
    system = layer_system(key, views, moments, in_maps, out_maps)
    _write(in_proj_view(mha), key, solve_blocks(system, ridge), system.bias)
    return {key: (int(system.allowed.sum()), views[0].weight.numel(), float(moments.count))}


def _write(layer: nn.Module, name: str, sol: torch.Tensor, bias: bool) -> None:
    with torch.no_grad():
        if bias:
            layer.bias.copy_(sol[:, -1].to(layer.bias.dtype))
            sol = sol[:, :-1]
        if sol.numel() != layer.weight.numel():
            raise ValueError(
                f"refit of {name!r} gives {tuple(sol.shape)} weights for a {tuple(layer.weight.shape)} layer"
            )
        layer.weight.copy_(sol.reshape(layer.weight.shape).to(layer.weight.dtype))
