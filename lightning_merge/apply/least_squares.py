"""PLeaS' second step: re-fit each merged layer so it reproduces the (partially) permuted sources.

For every Linear / Conv2d layer of the merged model, in forward order,

    W* = argmin_W ‖W X − Y‖² + ρ‖W‖²,   X: the *merged* model's inputs to the layer (earlier layers
    already re-fitted), Y = M_out · concat(source outputs of the layer) (each source on its own inputs),

so every layer corrects the drift its predecessors left. A layer whose output axis is in no merge
point (the final projection into a fixed space) targets the mean of the sources' outputs. We solve
the normal equations in closed form: XXᵀ, Σx, YXᵀ and Σy are accumulated in float64 over the loader
(conv: unfolded patches, every output position a row; the bias is the constant-1 column, folded in
through Σx and the row count), then (XXᵀ + ρ·tr(XXᵀ)/d·I) Wᵀ = (YXᵀ)ᵀ on the augmented system. The
official PLeaS code fits the same objective with a few hundred Adam steps per layer; the closed form
is its exact minimiser and much faster.

Cost: ``data`` is read once and kept; each model runs as a torch.fx graph that pauses before (merged)
or after (sources) the current layer and resumes there for the next one, keeping only each batch's
live activations, so the whole refit costs one forward per model and batch (models fx cannot trace
are re-run from their input per layer, ~L²/2 layer-forwards). The rest is the float64 products: for
convs XᵀX and YᵀX come from shifted windows of the input (strided ones: of its phases), no patch rows
(:mod:`lightning_merge.stats.patch_gram`; see benchmarks/results/patch_gram.md), for other layers from
blocks of ``CHUNK_ROWS`` rows of strided conv patches. Measured on 2 busy CPU cores,
ResNet-20×1, one batch of 500 Fashion-MNIST images: 146 s with a re-run per layer, ``F.unfold`` and
one float64 copy of all rows → 45 s with the resumed forwards and row blocks (3.2×); ResNet-20×4, one
batch of 100 images: 212 s → 47 s (4.5×). The shifted windows then take another 2.2–2.3× off
(benchmarks/results/patch_gram_refit.md); the weights agree to 8e-6 relative at every step.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from lightning_merge.dataflow import Ranks, all_reduce_sum_, check_max_batches, local_batches, model_device
from lightning_merge.graph.spec import MergeGraph
from lightning_merge.match.transform import SpaceTransform
from lightning_merge.stats.attention import (
    attention_output,
    check_attention,
    check_self_attention_call,
    context,
    in_proj_space,
    in_proj_view,
    qkv,
    stacked_block,
)
from lightning_merge.stats.patch_gram import input_gram, normal_sums, shifted_sums_apply, unfolded_rows

SOLVABLE = (nn.Linear, nn.Conv2d)
#: modules a refit steps through: the solvable layers and self-attention (its in_proj and out_proj,
#: which torch applies functionally, are solved through :mod:`lightning_merge.apply.attention`)
STEPPED = (*SOLVABLE, nn.MultiheadAttention)


class _Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is skipped."""


def forward_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the Linear/Conv2d and MultiheadAttention modules of ``model`` in the order a forward
    pass calls them (an attention module's call is checked to be plain self-attention)."""
    order: list[str] = []

    def seen(name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if isinstance(module, nn.MultiheadAttention):
            check_attention(module, name)
            check_self_attention_call(name, args, kwargs)
        if name not in order:
            order.append(name)

    handles = [
        mod.register_forward_pre_hook(lambda m, a, k, name=name: seen(name, m, a, k), with_kwargs=True)
        for name, mod in model.named_modules()
        if isinstance(mod, STEPPED)
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order


#: Rows per product chunk: bounds the float64 copies of the unfolded inputs (a ×4 ResNet stage-1
#: conv on 500 images unfolds to 392 000 × 577 values) while keeping each product a large GEMM.
CHUNK_ROWS = 16384


def _is_conv(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d)


def _unfold(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Conv input as (samples, d) rows matching ``weight.flatten(1)``; Linear input flattened."""
    return unfolded_rows(layer, x) if _is_conv(layer) else x.reshape(-1, x.shape[-1])


def _as_rows(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Layer output (or target) as (samples, out) rows in the same order as :func:`_unfold`."""
    if _is_conv(layer):
        return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


def _target(
    layer: nn.Module, outs: Sequence[torch.Tensor], blocks: Sequence[torch.Tensor] | None
) -> torch.Tensor:
    """Y = Σ_i M_i · out_i along the channel axis, or the sources' mean without a merge point.

    In the outputs' own precision: each entry mixes a few source features (no sum over data, which
    the normal equations take in float64); a float64 copy of every output cost a fifth of the refit."""
    if blocks is None:
        return torch.stack(outs).mean(0)
    dim = 1 if _is_conv(layer) else -1
    mixed = sum(torch.movedim(o, dim, -1) @ m.T.to(o.dtype) for o, m in zip(outs, blocks, strict=True))
    return torch.movedim(mixed, -1, dim)  # a view: channels stay innermost in memory


def _row_chunks(
    layer: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) row blocks of about CHUNK_ROWS rows: only one block is unfolded at a time."""
    per_sample = y[:1].numel() // y.shape[1] if _is_conv(layer) else 1
    lead = x.shape[0] if _is_conv(layer) else x.reshape(-1, x.shape[-1]).shape[0]
    if not _is_conv(layer):
        x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    step = max(1, CHUNK_ROWS // per_sample)
    for i in range(0, lead, step):
        yield _unfold(layer, x[i : i + step]), _as_rows(layer, y[i : i + step])


class _NormalEquations:
    """float64 sums XᵀX, Σx, YᵀX, Σy and the row count; the bias is the constant-1 column, folded in
    analytically (its Gram entries are Σx and the count), so no (rows, d+1) copy is ever built.
    Convs the shifted windows serve take every sum from them (strided ones over the input's phases;
    :func:`~lightning_merge.stats.patch_gram.normal_sums`); other layers take XᵀX from
    :func:`~lightning_merge.stats.patch_gram.input_gram` and YᵀX from row blocks of unfolded inputs."""

    def __init__(self) -> None:
        self.xx: torch.Tensor | None = None
        self.yx = self.xs = self.ys = torch.zeros(0)
        self.rows = 0

    def add(self, layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        if shifted_sums_apply(layer, x):  # shifted windows, no patch rows
            xx, xs, yx, rows = normal_sums(layer, x, y)
            ys = y.sum((0, 2, 3), dtype=torch.float64)
        else:
            xx, xs, rows = input_gram(layer, x)
            yx, ys = self._cross(layer, x, y)
        if self.xx is None:
            self.xx, self.xs, self.yx, self.ys = xx, xs, yx, ys
        else:
            for acc, part in zip((self.xx, self.xs, self.yx, self.ys), (xx, xs, yx, ys), strict=True):
                acc.add_(part)
        self.rows += rows

    @staticmethod
    def _cross(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """YᵀX and Σy from row blocks of the unfolded input (float64: float32 products lose too much
        for ill-conditioned layers)."""
        yx = ys = None
        for xr, yr in _row_chunks(layer, x, y):
            yr = yr.to(torch.float64)
            part = (yr.T @ xr.to(torch.float64), yr.sum(0))
            yx, ys = part if yx is None else (yx + part[0], ys + part[1])
        return yx, ys

    def all_reduce(self, ranks: Ranks | None) -> None:
        """Sum the equations over ranks (a rank without rows contributes zeros of the same shapes)."""
        assert self.xx is not None
        rows = torch.tensor(float(self.rows), dtype=torch.float64, device=self.xx.device)
        all_reduce_sum_([self.xx, self.xs, self.yx, self.ys, rows], ranks)
        self.rows = int(rows.item())

    def solve(self, ridge: float, bias: bool) -> torch.Tensor:
        """Ridge solution (out, d [+1]); ridge relative to the mean diagonal of the (augmented) Gram."""
        assert self.xx is not None
        xx, yx = self.xx, self.yx
        if bias:
            count = xx.new_full((1, 1), float(self.rows))
            xx = torch.cat([torch.cat([xx, self.xs[:, None]], 1), torch.cat([self.xs[None], count], 1)])
            yx = torch.cat([yx, self.ys[:, None]], 1)
        reg = ridge * float(xx.diagonal().mean().clamp_min(1e-12))
        eye = torch.eye(xx.shape[0], dtype=xx.dtype, device=xx.device)
        return torch.linalg.solve(xx + reg * eye, yx.T).T


def _capture(model: nn.Module, name: str, x: torch.Tensor, *, output: bool) -> torch.Tensor:
    """Run ``model`` on ``x`` until module ``name`` and return its input (or output)."""
    box: list[torch.Tensor] = []

    def pre(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        box.append(args[0])
        raise _Stop

    def post(_m: nn.Module, _a: Any, out: torch.Tensor) -> None:
        box.append(out)
        raise _Stop

    mod = model.get_submodule(name)
    handle = mod.register_forward_hook(post) if output else mod.register_forward_pre_hook(pre)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError(f"module {name!r} was not called during the forward pass")
    return box[0]


def _out_space(graph: MergeGraph, name: str) -> str | None:
    expects = f"least squares expects {name}.weight axis 0 to be all of"
    return graph.whole_producer(f"{name}.weight", 1, expects)


def _check_layer(name: str, layer: nn.Module) -> bool:
    """Whether to refit ``layer``: grouped/depthwise convs keep their merged weights (skipped)."""
    if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
        raise ValueError(f"least squares supports Conv2d with zero padding only; {name!r} is not")
    return not (isinstance(layer, nn.Conv2d) and layer.groups != 1)


class _Replay:
    """Fallback for models torch.fx cannot trace: every capture re-runs the model from its input."""

    def __init__(self, model: nn.Module, batches: Sequence[torch.Tensor]) -> None:
        self.model, self.batches = model, batches

    def capture(self, b: int, name: str, *, output: bool) -> torch.Tensor:
        return _capture(self.model, name, self.batches[b], output=output)


class _LeafTracer(fx.Tracer):
    """Keeps every Linear/Conv2d (subclasses included) a ``call_module`` node we can stop at."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, STEPPED) or super().is_leaf_module(m, qualname)


class _Stepper:
    """Runs a traced model node by node and keeps each batch's live values between layers.

    Layer k's pass resumes where layer k−1's stopped, so a network with L layers costs one forward
    per batch instead of ~L/2. Resuming is exact for the merged model too: the nodes still to run
    read the weights as they are now (earlier layers already re-fitted). Values are dropped after
    their last use, so the cache holds only the live activations (a few per batch)."""

    def __init__(
        self, model: nn.Module, graph: fx.Graph, root: nn.Module, batches: Sequence[torch.Tensor]
    ) -> None:
        self.model, self.root, self.batches = model, root, batches
        self.nodes = list(graph.nodes)
        index = {n: i for i, n in enumerate(self.nodes)}
        self.first_call: dict[str, int] = {}
        for i, n in enumerate(self.nodes):
            if n.op == "call_module":
                self.first_call.setdefault(str(n.target), i)
        self.free_after: list[list[fx.Node]] = [[] for _ in self.nodes]
        for n in self.nodes:
            last = max((index[u] for u in n.users), default=index[n])
            self.free_after[last].append(n)
        self.state = [(0, {}) for _ in batches]

    def capture(self, b: int, name: str, *, output: bool) -> torch.Tensor:
        i = self.first_call.get(name)
        if i is None:
            return _capture(self.model, name, self.batches[b], output=output)
        pos, env = self.state[b]
        if pos > i:  # asked for an earlier layer than the last one: start over
            pos, env = 0, {}
        stop = i + 1 if output else i
        value = None
        for j in range(pos, stop):
            node = self.nodes[j]
            env[node] = self._run(node, env, self.batches[b])
            if j == i:
                value = env[node]
            for dead in self.free_after[j]:
                env.pop(dead, None)
        self.state[b] = (stop, env)
        if output:
            return value
        node = self.nodes[i]
        return fx.node.map_arg(node.args[0], lambda n: env[n])

    def _run(self, node: fx.Node, env: dict[fx.Node, Any], x: torch.Tensor) -> Any:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
        if node.op == "placeholder":
            return x if node is self.nodes[0] else (args[0] if args else None)
        if node.op == "call_module":
            return self.root.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        if node.op == "get_attr":
            return functools.reduce(getattr, str(node.target).split("."), self.root)
        return args[0]  # output


def layer_runner(model: nn.Module, batches: Sequence[torch.Tensor]) -> _Stepper | _Replay:
    """A :class:`_Stepper` when torch.fx can trace ``model`` with every layer as a node; else replay.

    The trace runs on a shallow copy, so the tensor constants fx stores on its root never land on
    ``model``; submodules and parameters stay shared, so the steps see every re-fitted weight."""
    root = copy.copy(model)
    try:
        graph = _LeafTracer().trace(root)
    except Exception:  # noqa: BLE001 — any untraceable forward falls back to the exact replay
        return _Replay(model, batches)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if (
        not placeholders
        or placeholders[0] is not next(iter(graph.nodes))
        or any(not n.args for n in placeholders[1:])
    ):
        return _Replay(model, batches)
    return _Stepper(model, graph, root, batches)


def _fit(
    layer: nn.Module,
    name: str,
    pairs: Iterable[tuple[torch.Tensor, list[torch.Tensor]]],
    blocks: Sequence[torch.Tensor] | None,
    ridge: float,
    ranks: Ranks | None = None,
) -> int:
    """Accumulate the normal equations over (merged input, source outputs) pairs, sum them over ranks,
    solve, write back."""
    normal = _NormalEquations()
    for x, outs in pairs:
        normal.add(layer, x, _target(layer, outs, blocks))
    if normal.xx is None:
        raise ValueError(
            f"least squares for layer {name!r} got no batches: pass a non-empty, re-iterable loader "
            "(a DataLoader or list; it is read once per layer)"
        )
    normal.all_reduce(ranks)
    sol = normal.solve(ridge, layer.bias is not None)  # (out, d [+1])
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.copy_(sol[:, -1].to(layer.bias.dtype))
            sol = sol[:, :-1]
        layer.weight.copy_(sol.reshape(layer.weight.shape).to(layer.weight.dtype))
    return normal.rows


def _fit_attention(
    name: str,
    sources: Sequence[nn.Module],
    runners: Sequence[Any],
    num_batches: int,
    graph: MergeGraph,
    transforms: Mapping[str, SpaceTransform],
    ridge: float,
    ranks: Ranks | None,
) -> None:
    """Refit an attention module's in_proj (q, k, v rows on its attention space), then its out_proj on
    the context the refitted in_proj gives; both from the module's input, captured once per model."""
    merged = runners[0].model.get_submodule(name)
    mhas = [s.get_submodule(name) for s in sources]

    def inputs(b: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = runners[0].capture(b, name, output=False)
        return x, [r.capture(b, name, output=False) for r in runners[1:]]

    def blocks_of(space: str | None, channels: int) -> list[torch.Tensor] | None:
        if space is None:
            return None
        return _blocks64(
            [stacked_block(transforms[space].merge_block(i), channels) for i in range(len(mhas))]
        )

    view = in_proj_view(merged)
    in_blocks = blocks_of(in_proj_space(graph, name), view.out_features)
    pairs = (
        (x, [qkv(m, xi) for m, xi in zip(mhas, xs, strict=True)]) for x, xs in map(inputs, range(num_batches))
    )
    _fit(view, f"{name}.in_proj", pairs, in_blocks, ridge, ranks)
    out_blocks = blocks_of(_out_space(graph, f"{name}.out_proj"), merged.embed_dim)
    pairs = (
        (context(merged, x), [attention_output(m, xi) for m, xi in zip(mhas, xs, strict=True)])
        for x, xs in map(inputs, range(num_batches))
    )
    _fit(merged.out_proj, f"{name}.out_proj", pairs, out_blocks, ridge, ranks)


def _blocks64(blocks: Sequence[torch.Tensor] | None) -> list[torch.Tensor] | None:
    return None if blocks is None else [b.to(torch.float64) for b in blocks]


def least_squares_refit(
    merged: nn.Module,
    sources: Sequence[nn.Module],
    graph: MergeGraph,
    transforms: Mapping[str, SpaceTransform],
    data: Iterable[Any],
    *,
    ridge: float = 1e-4,
    max_batches: int | None = None,
    ranks: Ranks | None = None,
) -> nn.Module:
    """Re-fit every Linear/Conv2d of ``merged`` in forward order (in place; eval mode during the fit).

    ``data`` is read once (at most ``max_batches`` batches); every model's forward resumes from the
    previous layer (see :class:`_Stepper`)."""
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    check_max_batches(max_batches)
    device = model_device(merged)
    batches = local_batches(data, device, ranks, max_batches=max_batches, what="least squares")
    modes = [merged.training] + [s.training for s in sources]
    merged.eval()
    for s in sources:
        s.eval()
    try:
        with torch.no_grad():
            names = forward_order(merged, batches[0])
            runners = [layer_runner(m, batches) for m in (merged, *sources)]
            for name in names:
                layer = merged.get_submodule(name)
                if isinstance(layer, nn.MultiheadAttention):
                    _fit_attention(name, sources, runners, len(batches), graph, transforms, ridge, ranks)
                    continue
                if not _check_layer(name, layer):
                    continue
                space = _out_space(graph, name)
                blocks = None
                if space is not None:
                    blocks = _blocks64([transforms[space].merge_block(i) for i in range(len(sources))])
                pairs = (
                    (
                        runners[0].capture(b, name, output=False),
                        [r.capture(b, name, output=True) for r in runners[1:]],
                    )
                    for b in range(len(batches))
                )
                _fit(layer, name, pairs, blocks, ridge, ranks)
    finally:
        merged.train(modes[0])
        for s, mode in zip(sources, modes[1:], strict=True):
            s.train(mode)
    return merged
