"""Joint second moments of the N sources' inputs to every Linear / Conv2d layer (PLeaS from statistics).

For each supported layer (Linear, ungrouped Conv2d) one row is z = [x_1; …; x_N]: the N source
models' own input rows at that layer for the same sample and position, side by side (a conv row is
each model's unfolded C·kh·kw patch, in ``weight.flatten(1)`` order). We keep Σ z zᵀ, Σ z and the
row count, as a :class:`~lightning_merge.stats.container.FeatureMoments` per layer name, summed in
float64. Any least-squares problem whose inputs and targets are linear maps of the sources' own layer
inputs (PLeaS' published objective: averaged matched features, unmatched ones kept apart, targets
y_i = W_i x_i + b_i) has its normal equations in these sums, so the merge needs no data pass.

Self-attention (``nn.MultiheadAttention``, whose projections torch applies functionally, so no hook
on them fires) adds two layers: ``<name>.in_proj`` (the packed q/k/v projection; input: the
attention's input tokens) and ``<name>.out_proj`` (input: each model's own heads' context), both
computed from the attention module's input (:mod:`lightning_merge.stats.attention`).

Conv patches: the N inputs are concatenated along channels and passed to
:func:`~lightning_merge.stats.patch_gram.input_gram` with the source layer's kernel geometry, so a
conv takes the shifted-window products (a strided one over its input's phases) and never
materialises patches; 1×1 strided and small inputs take unfolded rows.

Precision: the sums are float64; the products that feed them run in the sources' own precision,
at least :data:`MIN_PRODUCTS` (float32 models: float32 products over one image row of a chunk,
or :data:`~lightning_merge.stats.patch_gram.SYM_ROWS` rows, each added in float64; float64
models: float64 throughout). The default is float64 products everywhere: a permuted copy must merge
back exactly, and float32 products leave PLeaS 1.4e-5 (relative output error) away from a small
torchvision ResNet's twin. Setting :data:`MIN_PRODUCTS` to ``torch.float32`` makes the products about
2× cheaper (a PLeaS merge 4.2× a ZipIt! merge's time instead of 8.9×, joint accuracy 48.94 vs 48.98,
``benchmarks/results/pleas_time_resnet20x1.md``).

Cost: the (N·d)² products are 2× those of the per-model ``grams`` statistic and dominate the pass
(``benchmarks/results/pleas_time.md``).

Wide layers: a Linear or conv whose joint width N·d exceeds :data:`ROWS_ABOVE` keeps the rows z
themselves (:class:`~lightning_merge.stats.container.JointRows`, n × N·d; a conv's rows are its
unfolded joint patches) instead of the (N·d)² sums while there are fewer rows than columns: a VGG's
first classifier layer sees 2·25088 joint inputs, a 20 GB Gram, while a calibration set of 2000
images gives 2000 rows (0.8 GB); a wide ResNet's last 3×3 convs see 2·9216 joint inputs (2.5 GB of
sums each) and, at the zoo's 16 images of 64 px, 64 rows. Once a layer's rows would outnumber its
columns they are folded into the sums (ZᵀZ, Σz, n) and later batches add to those, so a layer never
holds more than its Gram and the rows, at most, before the fold. Neither is in the up-front memory
check (how many rows a layer gets is known only as the pass goes), so each addition of rows and each
fold is checked against free memory and refused with the layer's name instead of an OOM kill.
Under DDP the ranks first sum their row counts: below the width every rank's rows are stacked (not
summed); above it every rank folds and the sums are summed, so all ranks take the same branch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_merge.dataflow import Ranks, all_gather_rows, all_reduce_sum_
from lightning_merge.stats.attention import check_attention, check_self_attention_call, context
from lightning_merge.stats.collector import ForwardCollector
from lightning_merge.stats.container import FeatureMoments, JointRows
from lightning_merge.stats.gram import supported_layers
from lightning_merge.stats.patch_gram import (
    check_same_shape,
    input_gram,
    linear_rows,
    output_positions,
    sym_gram,
    unfolded_rows,
)
from lightning_merge.stats.registry import register_statistic

#: Lowest precision of the products (the sums are float64 regardless); float32 is the faster opt-in.
MIN_PRODUCTS = torch.float64
#: A Linear whose joint input width N·d is above this keeps its rows, not its (N·d)² sums (2 GiB here).
ROWS_ABOVE = 16384


def keeps_rows(layer: nn.Module, joint_width: int) -> bool:
    """Whether a layer's joint inputs start as rows: a Linear or Conv2d wider than :data:`ROWS_ABOVE`."""
    return isinstance(layer, (nn.Linear, nn.Conv2d)) and joint_width > ROWS_ABOVE


def joint_inputs_memory_bytes(model: nn.Module, num_models: int) -> int:
    """float64 bytes of the accumulators for ``num_models`` copies of ``model``: (N·d)² + N·d + 1 per
    layer; a layer kept as rows (:func:`keeps_rows`) adds N·d per row as the pass goes, not counted
    (up to N·d rows; past that it folds them into its sums, (N·d)² again).

    Quadratic in N·d: a 3×3 conv with 256 input channels holds (2·2304)² values (170 MB) for N = 2."""
    dims = []
    for _, m in supported_layers(model):
        d = num_models * m.weight[0].numel()
        if not keeps_rows(m, d):
            dims.append(d)
    dims += [num_models * m.embed_dim for _, m in attention_modules(model)]  # the packed in_proj
    return 8 * sum(d * d + d + 1 for d in dims)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.MultiheadAttention]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]


@register_statistic
class JointInputsCollector(ForwardCollector):
    """Accumulates, per supported layer, Σ z zᵀ, Σ z and the row count of z = [x_1; …; x_N].

    A forward of models 0 … N−2 parks each layer input (in call order, so a layer called twice pairs
    call by call); model N−1's hook takes the parked inputs and adds the joint row products."""

    name = "joint_inputs"

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []
        self.active = False
        self.outer: dict[str, torch.Tensor] = {}
        self.total: dict[str, torch.Tensor] = {}
        self.count: dict[str, torch.Tensor] = {}
        self.parked: list[dict[str, list[torch.Tensor]]] = []
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.folded: dict[str, list[torch.Tensor]] = {}  # rows layers past their width: [ZᵀZ, Σz, n]
        self.num_models = 0

    def memory_bytes(self, models: Sequence[nn.Module]) -> int:
        """Bytes of the accumulators for these sources (checked against free memory up front)."""
        return joint_inputs_memory_bytes(models[0], len(models))

    def attach(self, models: Sequence[nn.Module]) -> None:
        self.detach()
        self.num_models = len(models)
        layers = [dict(supported_layers(m)) for m in models]
        names = list(layers[0])
        for i, per in enumerate(layers[1:], start=1):
            if list(per) != names:
                raise ValueError(f"model {i} has other Linear/Conv2d layers than model 0; cannot pair inputs")
        attention = [dict(attention_modules(m)) for m in models]
        # an attention's out_proj is a Linear its own hook never sees: the attention's hook feeds it
        widths = {name: module.weight[0].numel() for name, module in layers[0].items()}
        for name, mha in attention[0].items():
            check_attention(mha, name)
            widths[f"{name}.in_proj"] = widths[f"{name}.out_proj"] = mha.embed_dim
        dev = next(iter(layers[0].values())).weight.device if layers[0] else torch.device("cpu")
        self.outer, self.total, self.count, self.rows, self.folded = {}, {}, {}, {}, {}
        for name, width in widths.items():
            d = self.num_models * width
            if name in layers[0] and keeps_rows(layers[0][name], d):
                self.rows[name] = [torch.zeros(0, d, dtype=torch.float64, device=dev)]  # none yet
                continue
            self.outer[name] = torch.zeros(d, d, dtype=torch.float64, device=dev)
            self.total[name] = torch.zeros(d, dtype=torch.float64, device=dev)
            self.count[name] = torch.zeros((), dtype=torch.float64, device=dev)
        self.parked = [{n: [] for n in widths} for _ in range(self.num_models - 1)]
        for i, per in enumerate(layers):
            for name, module in per.items():
                self.handles.append(module.register_forward_hook(self._hook(i, name)))
        for i, per in enumerate(attention):
            for name, mha in per.items():
                hook = self._attention_hook(i, name)
                self.handles.append(mha.register_forward_pre_hook(hook, with_kwargs=True))

    def _add(self, i: int, name: str, layer: nn.Module, x: torch.Tensor) -> None:
        """Park model i's input to ``name`` or, for the last model, add the joint row products."""
        if i < self.num_models - 1:
            self.parked[i][name].append(x)
            return
        xs = [p[name].pop(0) for p in self.parked] + [x]
        if name in self.rows:
            kept, new, width = self._held(name), _row_count(layer, x), self.rows[name][0].shape[1]
            if kept + new <= width:
                _check_free(name, 8 * new * width, f"{new} more rows of its joint inputs", x.device)
                self.rows[name].append(_joint_rows(layer, xs, name))
                return
            _check_free(name, 8 * width * (width + 1), f"the sums of its {kept + new}+ rows", x.device)
            self.folded[name] = _fold(self.rows.pop(name))  # more rows than columns: sums are smaller
        products = torch.promote_types(x.dtype, MIN_PRODUCTS)
        xx, xs_sum, rows = input_gram(layer, xs, products, where=f"layer {name!r}")
        outer, total, count = self.folded[name] if name in self.folded else self._sums(name)
        outer.add_(xx)
        total.add_(xs_sum)
        count += rows

    def _held(self, name: str) -> int:
        """Rows this rank has seen at a rows layer: kept as rows, or counted in its folded sums."""
        if name in self.folded:
            return int(self.folded[name][2])
        return sum(len(c) for c in self.rows[name])

    def _sums(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.outer[name], self.total[name], self.count[name]

    def _hook(self, i: int, name: str):  # noqa: ANN202 — a forward hook
        def hook(mod: nn.Module, args: tuple, _out: torch.Tensor) -> None:
            if self.active:
                self._add(i, name, mod, args[0].detach())

        return hook

    def _attention_hook(self, i: int, name: str):  # noqa: ANN202 — a forward pre-hook
        def hook(mha: nn.MultiheadAttention, args: tuple, kwargs: dict) -> None:
            if not self.active:
                return
            check_self_attention_call(name, args, kwargs)
            x = args[0].detach()
            self._add(i, f"{name}.in_proj", mha.out_proj, x)  # out_proj: any Linear of input width E
            self._add(i, f"{name}.out_proj", mha.out_proj, context(mha, x))

        return hook

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def begin_batch(self) -> None:
        self.active = True

    def end_batch(self) -> None:
        self.active = False
        for p in self.parked:
            for lst in p.values():
                lst.clear()

    def states(self) -> list[torch.Tensor]:
        return [*self.outer.values(), *self.total.values(), *self.count.values()]

    def gather(self, ranks: Ranks) -> None:
        """Each rows layer as one (n, N·d) tensor of every rank's rows while the ranks' rows together
        are at most N·d; past that, as sums over every rank (each rank folds its rows first)."""
        names = sorted([*self.rows, *self.folded])  # the same layers on every rank, in one order
        if not names:
            return
        first = self.rows[names[0]][0] if names[0] in self.rows else self.folded[names[0]][0]
        counts = torch.tensor(
            [self._held(n) for n in names],
            dtype=torch.float64,
            device=first.device,  # where the collective runs (NCCL: the GPU)
        )
        all_reduce_sum_([counts], ranks)
        for name, count in zip(names, counts.tolist(), strict=True):
            chunks = self.rows.pop(name, None)
            width = (chunks[0] if chunks is not None else self.folded[name][1]).shape[-1]
            if count <= width:
                self.rows[name] = [all_gather_rows(_stacked(chunks), ranks)]
                continue
            sums = self.folded.pop(name) if chunks is None else _fold(chunks)
            all_reduce_sum_(sums, ranks)
            self.outer[name], self.total[name], self.count[name] = sums

    def result(self) -> dict[str, FeatureMoments | JointRows]:
        """The accumulators, handed over without a copy (the largest statistic, GBs for wide convs:
        a copy doubled the pass's peak memory) and dropped here, so one copy of them remains."""
        out: dict[str, FeatureMoments | JointRows] = {
            name: FeatureMoments(self.count[name], self.total[name], self.outer[name], self.num_models)
            for name in self.outer
        }
        for name, chunks in self.rows.items():
            out[name] = JointRows(_stacked(chunks), self.num_models)
        self.outer, self.total, self.count, self.rows = {}, {}, {}, {}
        return out

    @classmethod
    def to_tensors(
        cls, value: dict[str, FeatureMoments | JointRows]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors, rows = {}, []
        for layer, m in value.items():
            if isinstance(m, JointRows):
                tensors[f"{layer}/rows"] = m.rows
                rows.append(layer)
            else:
                tensors.update({f"{layer}/{f}": getattr(m, f) for f in _FIELDS})
        return tensors, {"layers": list(value), "rows": rows}

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], meta: Any, num_models: int
    ) -> dict[str, FeatureMoments | JointRows]:
        rows = set(meta.get("rows", []))
        return {
            layer: JointRows(tensors[f"{layer}/rows"], num_models)
            if layer in rows
            else FeatureMoments(*(tensors[f"{layer}/{f}"] for f in _FIELDS), num_models)
            for layer in meta["layers"]
        }

    @classmethod
    def check(cls, value: Any, num_models: int) -> None:
        kinds = (FeatureMoments, JointRows)
        if not isinstance(value, dict) or not all(isinstance(m, kinds) for m in value.values()):
            raise ValueError("statistics 'joint_inputs' must map layer names to FeatureMoments or JointRows")
        for layer, m in value.items():
            if isinstance(m, JointRows):
                if m.num_models != num_models or m.rows.dim() != 2 or m.rows.shape[1] % num_models:
                    raise ValueError(
                        f"statistics 'joint_inputs' of layer {layer!r}: {m.num_models} models, rows of shape "
                        f"{tuple(m.rows.shape)}; expected {num_models} models, (n, {num_models}·d)"
                    )
                continue
            if m.num_models != num_models or m.outer.shape != (m.total.numel(), m.total.numel()):
                raise ValueError(
                    f"statistics 'joint_inputs' of layer {layer!r}: {m.num_models} models, sums of shapes "
                    f"{tuple(m.total.shape)} / {tuple(m.outer.shape)}; expected {num_models} models, d / d×d"
                )


_FIELDS = ("count", "total", "outer")


def _joint_rows(layer: nn.Module, xs: Sequence[torch.Tensor], name: str) -> torch.Tensor:
    """The N models' inputs as (rows, N·d) float64, model by model along the features (a conv's:
    its unfolded patches of the inputs side by side along channels, as ``input_gram`` orders them)."""
    check_same_shape(xs, f"layer {name!r}")
    if isinstance(layer, nn.Conv2d):
        return unfolded_rows(layer, torch.cat(list(xs), 1)).to(torch.float64)
    return linear_rows(xs).to(torch.float64)


def _row_count(layer: nn.Module, x: torch.Tensor) -> int:
    """Rows one model's input ``x`` gives ``layer``: samples × output positions, or leading dims."""
    if isinstance(layer, nn.Conv2d):
        return x.shape[0] * output_positions(layer, x)
    return x.numel() // x.shape[-1]


def _check_free(name: str, need: int, what: str, device: torch.device) -> None:
    """A named error instead of an OOM kill mid-pass: rows and folded sums are allocated as the pass
    goes (the up-front check counts neither), so each allocation is checked against free memory."""
    from lightning_merge.stats.collect import available_memory_bytes  # collect imports the registry

    free = available_memory_bytes(device)
    if free is not None and need > free:
        raise MemoryError(
            f"joint_inputs of layer {name!r}: {what} need {need / 2**30:.2f} GiB, more than the "
            f"{free / 2**30:.2f} GiB free on {device}; use fewer calibration samples or a device with "
            "more memory"
        )


def _fold(chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Rows as the sums the Gram path keeps: [ZᵀZ, Σz, n] (float64)."""
    rows = _stacked(chunks)
    count = torch.tensor(float(rows.shape[0]), dtype=torch.float64, device=rows.device)
    return [sym_gram(rows), rows.sum(0), count]


def _stacked(chunks: list[torch.Tensor]) -> torch.Tensor:
    """One (n, N·d) tensor (the first chunk is the empty one from ``attach``: the width is known
    even for a layer the pass never called)."""
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
