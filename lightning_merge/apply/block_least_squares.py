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

from lightning_merge.apply.axis_map import AxisMap, axis_map
from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match.transform import SpaceTransform
from lightning_merge.stats.attention import in_proj_view
from lightning_merge.stats.container import FeatureMoments, JointRows


def _kernel_size(layer: nn.Module) -> int:
    """Input positions per channel in a weight row: a conv's kernel (rows c·K + p), 1 for a Linear."""
    return layer.weight[0, 0].numel() if isinstance(layer, nn.Conv2d) else 1


@dataclass(frozen=True)
class LayerSystem:
    """The augmented normal equations of one merged layer and which weights may be non-zero."""

    xx: torch.Tensor  # (d' [+1], d' [+1])
    yx: torch.Tensor  # (o', d' [+1])
    allowed: torch.Tensor  # (o', d') bool: weight entries outside the structural zero blocks
    bias: bool

    def mean_diagonal(self) -> float:
        return float(self.xx.diagonal().mean())

    def solve(self, rows: torch.Tensor, cols: torch.Tensor, reg: float) -> torch.Tensor:
        """(|rows|, |cols|): output rows ``rows`` fitted on input columns ``cols`` only."""
        sub = self.xx if len(cols) == len(self.xx) else self.xx[cols[:, None], cols[None, :]]
        return _ridge_solve(sub, self.yx[rows][:, cols].T, reg).T


@dataclass(frozen=True)
class RowSystem:
    """The same system as its n sample rows, for a wide layer (:class:`JointRows`): XᵀX = F Fᵀ and
    YXᵀ = T Fᵀ, solved in sample space by the push-through identity
    (F Fᵀ + λI)⁻¹ F Tᵀ = F (FᵀF + λI)⁻¹ Tᵀ, so the (d' × d') Gram is never formed."""

    f: torch.Tensor  # (d' [+1], n): the merged layer's inputs, one column per row (bias: a row of 1s)
    t: torch.Tensor  # (o', n): its targets
    allowed: torch.Tensor
    bias: bool

    def mean_diagonal(self) -> float:
        return float(self.f.square().sum() / self.f.shape[0])

    def solve(self, rows: torch.Tensor, cols: torch.Tensor, reg: float) -> torch.Tensor:
        fs = self.f if len(cols) == len(self.f) else self.f[cols]
        w = _ridge_solve(fs.T @ fs, self.t[rows].T, reg)  # (n, |rows|)
        return w.T @ fs.T


def _check_width(name: str, width: int, num: int, d: int) -> None:
    if width != num * d:
        raise ValueError(
            f"joint input moments of {name!r} have width {width}, expected "
            f"{num} models × {d} inputs: gathered for other models"
        )


def layer_system(
    name: str,
    layers: Sequence[nn.Module],
    moments: FeatureMoments | JointRows,
    in_maps: AxisMap,
    out_maps: AxisMap,
) -> LayerSystem | RowSystem:
    """Normal equations of merged layer ``name`` from the joint input moments of its sources' ``layers``."""
    if isinstance(moments, JointRows):
        return row_system(name, layers, moments, in_maps, out_maps)
    num, dev, k = len(layers), moments.outer.device, _kernel_size(layers[0])
    p, q = in_maps.to(dev), out_maps.to(dev)  # C → C' per model, o → o' per model
    _check_width(name, moments.outer.shape[0], num, p.length * k)
    ymap = _target_map(layers, q)  # Y = ymap · z (+ c)
    pg = p.apply_joint(moments.outer, k)  # P G: (d', N·d)
    xx, yx = p.apply_joint(pg.T.contiguous(), k), ymap @ pg.T  # P G Pᵀ, Ỹ G Pᵀ
    bias = layers[0].bias is not None
    if bias:  # augment by the constant-1 input: [[P G Pᵀ, P t], [(P t)ᵀ, n]]
        c = _bias_target(layers, q)
        pt, n = p.apply_joint(moments.total[:, None], k), moments.count.reshape(1, 1)
        xx = torch.cat([torch.cat([xx, pt], 1), torch.cat([pt.T, n], 1)])
        yx = torch.cat([yx + c[:, None] * pt.T, (ymap @ moments.total + c * moments.count)[:, None]], 1)
    return LayerSystem(xx=xx, yx=yx, allowed=_allowed(p, q, k), bias=bias)


def row_system(
    name: str,
    layers: Sequence[nn.Module],
    joint: JointRows,
    in_maps: AxisMap,
    out_maps: AxisMap,
) -> RowSystem:
    """:func:`layer_system` from the joint rows Z (n, N·d) of a Linear or a conv (its unfolded
    patches, rows c·K + p per model): F = P Zᵀ, T = Ỹ Zᵀ + c."""
    num, dev, k = len(layers), joint.rows.device, _kernel_size(layers[0])
    p, q = in_maps.to(dev), out_maps.to(dev)
    _check_width(name, joint.rows.shape[1], num, p.length * k)
    zt = joint.rows.T.contiguous()  # (N·d, n)
    f, t = p.apply_joint(zt, k), _target_map(layers, q) @ zt
    bias = layers[0].bias is not None
    if bias:
        t += _bias_target(layers, q)[:, None]
        f = torch.cat([f, f.new_ones(1, f.shape[1])])
    return RowSystem(f=f, t=t, allowed=_allowed(p, q, k), bias=bias)


def _target_map(layers: Sequence[nn.Module], q: AxisMap) -> torch.Tensor:
    """Ỹ = [Q_1 W_1, …, Q_N W_N]: the merged targets as a map of the joint input z."""
    dev = q.vals[0].device
    weights = [m.weight.detach().to(dev, torch.float64).reshape(m.weight.shape[0], -1) for m in layers]
    return torch.cat([q.apply(i, w) for i, w in enumerate(weights)], 1)


def _bias_target(layers: Sequence[nn.Module], q: AxisMap) -> torch.Tensor:
    """c = Σ_i Q_i b_i: the targets' constant part."""
    dev = q.vals[0].device
    return sum(q.apply(i, m.bias.detach().to(dev, torch.float64)) for i, m in enumerate(layers))


def _allowed(p: AxisMap, q: AxisMap, k: int) -> torch.Tensor:
    """(o', d') bool: weight (o, j) may be non-zero when o's and j's owning models intersect."""
    owners_in = p.owners().repeat_interleave(k, dim=1)  # (N, d')
    owners_out = q.owners()  # (N, o')
    return (owners_out[:, :, None] & owners_in[:, None, :]).any(0)


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


def solve_blocks(system: LayerSystem | RowSystem, ridge: float) -> torch.Tensor:
    """(o', d' [+1]) solution with the structural zeros held: one solve per group of output rows
    with the same allowed inputs; ridge relative to the mean diagonal of the augmented Gram."""
    allowed = system.allowed
    if system.bias:
        allowed = torch.cat([allowed, allowed.new_ones(allowed.shape[0], 1)], 1)
    reg = ridge * max(system.mean_diagonal(), 1e-12)
    sol = torch.zeros(allowed.shape, dtype=torch.float64, device=allowed.device)
    patterns, group = torch.unique(allowed, dim=0, return_inverse=True)
    for g, cols in enumerate(patterns):
        rows = torch.nonzero(group == g).flatten()
        idx = torch.nonzero(cols).flatten()
        sol[rows[:, None], idx[None, :]] = system.solve(rows, idx, reg)
    return sol


def refit_from_statistics(
    merged: nn.Module,
    sources: Sequence[nn.Module],
    graph: MergeGraph,
    transforms: Mapping[str, SpaceTransform],
    joint_inputs: Mapping[str, FeatureMoments | JointRows],
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
        in_maps = axis_map(graph, f"{name}.weight", 1, src.weight.shape[1], transforms, num)
        out_maps = axis_map(graph, f"{name}.weight", 0, src.weight.shape[0], transforms, num)
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
    joint_inputs: Mapping[str, FeatureMoments | JointRows],
    ridge: float,
) -> dict[str, tuple[int, int, float]]:
    """The packed q/k/v projection of a self-attention, fitted like a Linear(E, 3E) (its out_proj is
    an ordinary Linear with its own joint moments)."""
    key, moments = f"{name}.in_proj", joint_inputs[f"{name}.in_proj"]
    if float(moments.count) == 0:
        return {}
    views = [in_proj_view(s.get_submodule(name)) for s in sources]
    e, num = mha.embed_dim, len(sources)
    in_maps = axis_map(graph, f"{name}.in_proj_weight", 1, e, transforms, num)
    out_maps = axis_map(graph, f"{name}.in_proj_weight", 0, 3 * e, transforms, num)
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
