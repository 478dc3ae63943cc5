"""Feature moments (count, Σf, Σffᵀ in float64) of N models' concatenated features at every space.

A ``forward_pre_hook`` on every tapped module stashes that module's input (a reference, no
copy, no per-sample work). When the last of the N models reaches the tap, the N inputs are
written side by side into one float64 matrix X (samples × N·n, one strided copy per model) and
accumulated with one ``addmm_`` (Σffᵀ += XᵀX) and one column sum. So the extra memory is one
(N·n)² float64 matrix per space plus one transient X, and the inputs of the first N-1 models
live only until the last model reaches the same tap.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_merge.graph.spec import MergeGraph, Tap
from lightning_merge.stats.collector import ForwardCollector, SumMetric
from lightning_merge.stats.container import FeatureMoments
from lightning_merge.stats.registry import register_statistic

_F64 = torch.float64
_PARTS = ("count", "total", "outer")


class SpaceMoments(SumMetric):
    """count, Σf, Σffᵀ of one space as torchmetrics sum states (:class:`SumMetric`: the only
    (dim × dim) allocation is the state itself)."""

    count: Tensor
    total: Tensor
    outer: Tensor

    def __init__(self, dim: int, num_models: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_models = num_models
        self.add_sum_state("count", (), device)
        self.add_sum_state("total", (dim,), device)
        self.add_sum_state("outer", (dim, dim), device)

    def update(self, features: Tensor, column_sum: Tensor | None = None) -> None:
        """Add a batch given samples-as-columns: ``features`` is (dim × samples).

        This layout keeps the copy from NCHW maps contiguous and makes Σffᵀ ``Z Zᵀ`` GEMMs, which
        BLAS runs faster than ``XᵀX`` on a tall (samples × dim) matrix. Σffᵀ is symmetric, so only
        the blocks on and above the diagonal are multiplied (about 25-35% fewer flops for large
        spaces); :meth:`symmetrize` copies them below the diagonal.
        """
        self.count += features.shape[1]
        self.total += features.sum(1, dtype=_F64) if column_sum is None else column_sum
        bounds = _block_bounds(features.shape[0])
        for i, (a, b) in enumerate(bounds):
            for c, d in bounds[i:]:
                if features.dtype == _F64:
                    self.outer[a:b, c:d].addmm_(features[a:b], features[c:d].T)
                else:  # a lower-precision batch product, summed across batches in float64
                    self.outer[a:b, c:d] += (features[a:b] @ features[c:d].T).to(_F64)
        self._symmetric = False

    def symmetrize(self) -> None:
        """Mirror the accumulated upper blocks below the diagonal (idempotent)."""
        if getattr(self, "_symmetric", True):
            return
        bounds = _block_bounds(self.outer.shape[0])
        for i, (a, b) in enumerate(bounds):
            for c, d in bounds[i + 1 :]:
                self.outer[c:d, a:b] = self.outer[a:b, c:d].T
        self._symmetric = True

    def compute(self) -> FeatureMoments:
        self.symmetrize()
        return FeatureMoments(self.count, self.total, self.outer, self.num_models)


def _block_bounds(dim: int) -> list[tuple[int, int]]:
    """Row ranges of the symmetric blocking: 1 block below 96 features, 2 up to 512, then 4.

    Measured on CPU (MKL, float64): 2-4 blocks save 20-35% of the Σffᵀ time for 128-1024
    features; below ~100 the extra GEMM calls cost more than they save.
    """
    k = 1 if dim < 96 else 2 if dim <= 512 else 4
    edges = [round(dim * i / k) for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def tapped_spaces(graph: MergeGraph) -> list[str]:
    """Names of the spaces observed at some tap, in the graph's (forward) order."""
    seen = {seg.space for tap in graph.taps for seg in tap.segments}
    return [s.name for s in graph.spaces if s.name in seen]


def moments_memory_bytes(graph: MergeGraph, num_models: int) -> int:
    """Bytes of the accumulated moments: one (N·n)² + N·n + 1 float64 block per tapped space."""
    dims = [num_models * graph.space(name).size for name in tapped_spaces(graph)]
    return 8 * sum(d * d + d + 1 for d in dims)


def check_models_match_graph(models: Sequence[nn.Module], graph: MergeGraph) -> None:
    """Every tap module exists and every parameter/buffer in the graph has its recorded shape."""
    for i, model in enumerate(models):
        modules = dict(model.named_modules())
        for tap in graph.taps:
            if tap.module not in modules:
                raise ValueError(
                    f"model {i} does not match the merge graph: it has no module {tap.module!r} "
                    f"(tap of merge points {[s.space for s in tap.segments]})"
                )
            if tap.kind == "attention" and not _is_attention(modules[tap.module]):
                raise TypeError(
                    f"model {i}: attention tap {tap.module!r} is a {type(modules[tap.module]).__name__}, "
                    "expected nn.MultiheadAttention or a module with a packed qkv Linear (Swin)"
                )
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        for name, shape in graph.param_shapes.items():
            if name not in tensors:
                raise ValueError(f"model {i} does not match the merge graph: it has no tensor {name!r}")
            if tuple(tensors[name].shape) != tuple(shape):
                raise ValueError(
                    f"model {i} does not match the merge graph: {name!r} has shape "
                    f"{tuple(tensors[name].shape)}, the graph expects {tuple(shape)}"
                )


def _first_input(module_name: str, args: tuple, kwargs: dict) -> Tensor:
    x = args[0] if args else next(iter(kwargs.values()), None)
    if not isinstance(x, Tensor):
        raise TypeError(f"the first input of tapped module {module_name!r} is not a tensor: {type(x)}")
    return x


def _version_of(x: Tensor) -> int | None:
    """In-place modification counter (inference tensors have none, and cannot be modified)."""
    return None if x.is_inference() else x._version


def _is_attention(module: nn.Module) -> bool:
    """nn.MultiheadAttention, or a self-attention with a packed ``qkv`` Linear (torchvision's Swin)."""
    qkv = getattr(module, "qkv", None)
    return isinstance(module, nn.MultiheadAttention) or (
        isinstance(qkv, nn.Linear) and qkv.out_features == 3 * qkv.in_features
    )


def _attention_projections(mha: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """q, k and v projections of an attention call, stacked as rows (3, ..., E)."""
    if not isinstance(mha, nn.MultiheadAttention):  # packed qkv Linear on the (..., E) input
        x = _first_input(type(mha).__name__, args, kwargs)
        return F.linear(x, mha.qkv.weight, mha.qkv.bias).unflatten(-1, (3, -1)).movedim(-2, 0)
    names = ("query", "key", "value")
    query, key, value = (args[j] if len(args) > j else kwargs[name] for j, name in enumerate(names))
    if mha._qkv_same_embed_dim:
        weights = mha.in_proj_weight.chunk(3)
    else:
        weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    projected = [F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases, strict=True)]
    if not projected[0].shape == projected[1].shape == projected[2].shape:
        # cross-attention with other lengths: flatten each to rows and stack those instead
        return torch.cat([p.reshape(-1, p.shape[-1]) for p in projected])
    return torch.stack(projected)


@register_statistic
class FeatureMomentsCollector(ForwardCollector):
    """Collector ``"moments"``: :class:`SpaceMoments` for every space observed at a tap.

    A space observed at several taps pools the samples of all of them; a tap with several
    segments (e.g. the input of a Linear after ``cat``) feeds each segment's space. Its value is
    ``{space: FeatureMoments}``, saved as ``moments/<space>/{count,total,outer}``.
    """

    name = "moments"

    def __init__(self, graph: MergeGraph, *, batch_dtype: torch.dtype = _F64) -> None:
        if not graph.taps:
            raise ValueError("the merge graph has no taps: there is nowhere to observe features")
        for tap in graph.taps:
            if tap.inner < 1:
                raise ValueError(f"tap {tap.module!r}: inner must be >= 1, got {tap.inner}")
            for seg in tap.segments:
                size = graph.space(seg.space).size  # KeyError names an unknown space
                if seg.size != size or seg.offset < 0:
                    raise ValueError(
                        f"tap {tap.module!r}: segment of merge point {seg.space!r} has offset "
                        f"{seg.offset} and size {seg.size}, but the space has size {size}"
                    )
        if batch_dtype not in (torch.float64, torch.float32):
            raise ValueError(f"batch_dtype must be torch.float64 or torch.float32, got {batch_dtype}")
        self.graph = graph
        self.batch_dtype = batch_dtype
        self.metrics: dict[str, SpaceMoments] = {}
        self.num_models = 0
        self._handles: list[RemovableHandle] = []
        self._stash: list[list[list[Any]]] = []  # [tap][model] -> (input, its _version) this batch
        self._calls: list[int] = []  # calls of the last model per tap this batch
        self._sums: list[tuple[Tap, str, Tensor]] = []  # column sums, for the finiteness check
        self._ws: Tensor | None = None  # reused per-tap block (see _accumulate_space)

    def memory_bytes(self, models: Sequence[nn.Module]) -> int:
        """Bytes of the accumulators for these sources (checked against free memory up front)."""
        return moments_memory_bytes(self.graph, len(models))

    def attach(self, models: Sequence[nn.Module]) -> None:
        check_models_match_graph(models, self.graph)
        self.detach()
        self.num_models = len(models)
        device = next(models[0].parameters(), torch.empty(0)).device
        self.metrics = {
            name: SpaceMoments(self.num_models * self.graph.space(name).size, self.num_models, device)
            for name in tapped_spaces(self.graph)
        }
        self._stash = [[[] for _ in models] for _ in self.graph.taps]
        self._calls = [0] * len(self.graph.taps)
        for t, tap in enumerate(self.graph.taps):
            for i, model in enumerate(models):
                hook = functools.partial(self._hook, t, i)
                module = model.get_submodule(tap.module)
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._ws = None

    def end_batch(self) -> None:
        self._finish_batch()

    def abort_batch(self) -> None:
        for stashes in self._stash:
            for stash in stashes:
                stash.clear()
        self._calls = [0] * len(self._calls)
        self._sums = []

    def states(self) -> list[Tensor]:
        for metric in self.metrics.values():
            metric.symmetrize()  # before the cross-rank sum, so every rank sends a full matrix
        return [s for m in self.metrics.values() for s in (m.count, m.total, m.outer)]

    def result(self) -> dict[str, FeatureMoments]:
        return {name: metric.compute() for name, metric in self.metrics.items()}

    @classmethod
    def from_graph(cls, graph: MergeGraph) -> FeatureMomentsCollector:
        return cls(graph)

    @classmethod
    def to_tensors(cls, value: dict[str, FeatureMoments]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        tensors = {f"{space}/{part}": getattr(m, part) for space, m in value.items() for part in _PARTS}
        return tensors, {
            "spaces": list(value),
            "counts": {space: float(m.count) for space, m in value.items()},
        }

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, Tensor], meta: dict[str, Any], num_models: int
    ) -> dict[str, FeatureMoments]:
        parts = [tensors[f"{space}/{part}"] for space in meta["spaces"] for part in _PARTS]
        return {
            space: FeatureMoments(*parts[3 * k : 3 * k + 3], num_models)
            for k, space in enumerate(meta["spaces"])
        }

    @classmethod
    def check(cls, value: Any, num_models: int) -> None:
        if not isinstance(value, dict):
            raise ValueError(
                f"statistics 'moments' is a {type(value).__name__}, expected {{space: FeatureMoments}}"
            )
        for space, m in value.items():
            if not isinstance(m, FeatureMoments):
                raise ValueError(f"statistics 'moments' of space {space!r} is a {type(m).__name__}")
            dim = m.total.shape[0] if m.total.ndim == 1 else -1
            if m.count.ndim != 0 or dim < 0 or tuple(m.outer.shape) != (dim, dim):
                raise ValueError(
                    f"statistics 'moments' of space {space!r}: count {tuple(m.count.shape)}, total "
                    f"{tuple(m.total.shape)} and outer {tuple(m.outer.shape)} are not (), (d,) and (d, d)"
                )
            if m.num_models != num_models or dim % num_models:
                raise ValueError(
                    f"statistics 'moments' of space {space!r} are for {m.num_models} models of width "
                    f"{dim}, the statistics are for {num_models} models"
                )

    # -- hooks ---------------------------------------------------------------------------------

    def _hook(self, t: int, i: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
        tap = self.graph.taps[t]
        if tap.kind == "attention":
            x = _attention_projections(module, args, kwargs)
        else:
            x = _first_input(tap.module, args, kwargs)
        self._check_width(tap, i, x)
        if i < self.num_models - 1:
            self._stash[t][i].append((x, _version_of(x)))
            return
        k = self._calls[t]
        self._calls[t] += 1
        inputs = []
        for j in range(self.num_models - 1):
            if len(self._stash[t][j]) <= k:
                raise RuntimeError(
                    f"tap {tap.module!r} was called more often in model {i} than in model {j}: "
                    "the N models must have the same forward structure"
                )
            stashed, version = self._stash[t][j][k]
            self._stash[t][j][k] = None  # free it as soon as it is used
            if _version_of(stashed) != version:
                raise RuntimeError(
                    f"model {j} modified the input of {tap.module!r} in place after the module read "
                    "it (e.g. an inplace op on a tensor used twice); the stashed features are stale"
                )
            inputs.append(stashed)
        inputs.append(x)
        self._accumulate(tap, inputs)

    def _check_width(self, tap: Tap, i: int, x: Tensor) -> None:
        width = x.shape[tap.channel_dim if tap.kind == "input" else -1]
        needed = max(seg.offset + seg.size for seg in tap.segments) * tap.inner
        if width % tap.inner or width < needed:
            raise ValueError(
                f"model {i} does not match the merge graph: the input of {tap.module!r} has "
                f"{width} channels on dim {tap.channel_dim}, the graph needs {needed}"
                + (f" (a multiple of inner={tap.inner})" if tap.inner > 1 else "")
            )

    def _accumulate(self, tap: Tap, inputs: list[Tensor]) -> None:
        features = [self._channels_first(tap, x) for x in inputs]
        for seg in tap.segments:
            parts = [f[seg.offset : seg.offset + seg.size] for f in features]
            column_sum = self._accumulate_space(self.metrics[seg.space], parts)
            self._sums.append((tap, seg.space, column_sum))

    def _accumulate_space(self, metric: SpaceMoments, parts: list[Tensor]) -> Tensor:
        """Write the N models' (n, *samples) features side by side into the reused workspace and add
        them; returns the batch's column sum.

        The workspace is allocated once per pass (the largest tap's block): a fresh (N·n × samples)
        float64 block per tap (51 MB at ResNet-20×1's first stage) was mapped and zero-filled by the
        kernel every time, which cost more than its product. The additions are the same as with a
        fresh block, so the moments are bitwise unchanged. (Cache-sized chunks of samples were faster
        per tap at one thread, but with 2 threads on the loaded 2-core machine their many small
        parallel ops made the pass slower; NumPy's syrk likewise: see stats_pass_profile.md.)
        """
        n, dim = parts[0].shape[0], parts[0].shape[0] * len(parts)
        sample_shape = parts[0].shape[1:]
        block = self._workspace(dim * sample_shape.numel(), parts[0].device).view(dim, *sample_shape)
        for j, f in enumerate(parts):
            block[j * n : (j + 1) * n].copy_(f)
        columns = block.view(dim, -1)
        column_sum = columns.sum(1, dtype=_F64)
        metric.update(columns, column_sum)
        return column_sum

    def _workspace(self, numel: int, device: torch.device) -> Tensor:
        """A flat buffer of at least ``numel`` batch-dtype elements, allocated once and reused."""
        ws = self._ws
        if ws is None or ws.numel() < numel or ws.device != device or ws.dtype != self.batch_dtype:
            ws = self._ws = torch.empty(numel, dtype=self.batch_dtype, device=device)
        return ws[:numel]

    @staticmethod
    def _channels_first(tap: Tap, x: Tensor) -> Tensor:
        """A view (C, *samples); with ``inner > 1`` the flattened (C, inner) block → (C, ..., inner).

        Moving only the channel axis keeps the sample axes in memory order (H, W of an NCHW map
        stay contiguous), so the copy into the float64 block reads whole rows.
        """
        x = x.movedim(tap.channel_dim if tap.kind == "input" else -1, -1)
        if tap.inner > 1:
            x = x.unflatten(-1, (x.shape[-1] // tap.inner, tap.inner)).movedim(-2, 0)
            return x
        return x.movedim(-1, 0)

    def _finish_batch(self) -> None:
        """Check that every stashed input was used and every feature was finite (one check/batch)."""
        for t, tap in enumerate(self.graph.taps):
            for j, stash in enumerate(self._stash[t]):
                if len(stash) != self._calls[t] and j < self.num_models - 1:
                    raise RuntimeError(
                        f"tap {tap.module!r} was called {len(stash)} times in model {j} but "
                        f"{self._calls[t]} times in model {self.num_models - 1}"
                    )
                stash.clear()
            self._calls[t] = 0
        sums, self._sums = self._sums, []
        if sums and not bool(torch.isfinite(torch.cat([s for _, _, s in sums])).all()):
            self._raise_non_finite(sums)

    def _raise_non_finite(self, sums: list[tuple[Tap, str, Tensor]]) -> None:
        for tap, space, column_sum in sums:
            bad = (~torch.isfinite(column_sum)).nonzero().flatten()
            if len(bad):
                model = int(bad[0]) // self.graph.space(space).size
                raise ValueError(
                    f"non-finite features (NaN or inf) from model {model} at merge point {space!r} "
                    f"(input of module {tap.module!r})"
                )
