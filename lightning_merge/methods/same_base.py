"""Shared plumbing of the merges of models fine-tuned from one base (task arithmetic, TIES, Fisher,
RegMean, MaTS): compatibility checks, task vectors, the fallback rule and the [W | b] layer layout.

Rules common to these methods:

* only *parameters* are merged by the method; float buffers (BatchNorm running statistics, the
  frozen class embeddings of an ``EmbeddingHead``) are averaged over the sources, integer buffers
  (``num_batches_tracked``) are copied from source 0;
* with a ``base`` the methods work on task vectors τᵢ = θᵢ − θ₀, without one on the parameters;
* all arithmetic is float64, cast back to each tensor's dtype at the end;
* ``merge``'s ``data`` (the calibration loader) is accepted and unused: these methods read only
  the statistics gathered by the pass.
"""

from __future__ import annotations

import copy
import dataclasses
from abc import abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_merge.graph.spec import MergeGraph
from lightning_merge.methods.base import MergeMethod, MergeResult
from lightning_merge.stats.collect import collect_statistics
from lightning_merge.stats.container import Statistics

State = dict[str, torch.Tensor]


@dataclass
class SameBaseInputs:
    """What every same-base merge reads, checked once by :meth:`SameBaseMethod.merge`."""

    sources: Sequence[nn.Module]
    states: list[State]  # the sources' state dicts, names and shapes checked to agree
    params: list[str]  # parameter (not buffer) names, state-dict order
    base: State | None  # the shared base's state dict, when given
    stats: Statistics | None
    diagnostics: dict[str, Any] = field(default_factory=dict)  # this call's details, for the result


class SameBaseMethod(MergeMethod):
    """``merge`` = checks → buffers rule → :meth:`merge_parameters` → a copy of source 0.

    A new same-base method only writes :meth:`merge_parameters`; the checks (base present when
    ``needs_base``, statistics present for ``requires``, identical names and shapes) live here.
    """

    def merge(
        self,
        sources: Sequence[nn.Module],
        *,
        graph: MergeGraph | None = None,
        stats: Statistics | None = None,
        base: nn.Module | None = None,
        data: Iterable[Any] | None = None,
    ) -> MergeResult:
        if self.needs_base and base is None:
            raise ValueError(
                f"{self.name}: the method works on task vectors θᵢ − θ₀ and needs the shared base "
                "model: pass base=..."
            )
        self.check_stats(stats)
        states = check_sources(sources, base, self.name)
        params = parameter_names(sources[0])
        merged = buffers_rule(states, params)
        inputs = SameBaseInputs(sources, states, params, base_state(base), stats)
        merged.update(self.merge_parameters(inputs))
        return MergeResult(build(sources[0], merged), diagnostics=inputs.diagnostics)

    @abstractmethod
    def merge_parameters(self, inputs: SameBaseInputs) -> State:
        """The merged value (float64 is fine) of every name in ``inputs.params``; details worth
        reporting go into ``inputs.diagnostics`` (a fresh dict per call)."""


def _label(i: int | None) -> str:
    return "the base model" if i is None else f"model {i}"


def check_sources(sources: Sequence[nn.Module], base: nn.Module | None, method: str) -> list[State]:
    """The sources' state dicts (float64-free, detached) after checking names and shapes agree.

    Raises naming the first differing parameter and the model index (or "the base model").
    """
    if len(sources) < 2:
        raise ValueError(f"{method}: merging needs at least 2 source models, got {len(sources)}")
    for i, m in enumerate(sources):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{method}: source {i} is a {type(m).__name__}, not an nn.Module")
    states = [{k: v.detach() for k, v in m.state_dict().items()} for m in sources]
    ref = states[0]
    others: list[tuple[int | None, State]] = list(enumerate(states))[1:]
    if base is not None:
        if not isinstance(base, nn.Module):
            raise TypeError(f"{method}: base is a {type(base).__name__}, not an nn.Module")
        others.append((None, {k: v.detach() for k, v in base.state_dict().items()}))
    for i, st in others:
        for name in ref:
            if name not in st:
                raise ValueError(f"{method}: {_label(i)} has no parameter {name!r} (model 0 has)")
            if st[name].shape != ref[name].shape:
                raise ValueError(
                    f"{method}: parameter {name!r} of {_label(i)} has shape {tuple(st[name].shape)}, "
                    f"model 0 has {tuple(ref[name].shape)}"
                )
        extra = [name for name in st if name not in ref]
        if extra:
            raise ValueError(f"{method}: {_label(i)} has parameter {extra[0]!r} that model 0 lacks")
    return states


def base_state(base: nn.Module | None) -> State | None:
    return None if base is None else {k: v.detach() for k, v in base.state_dict().items()}


def parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters (not buffers) in state-dict order."""
    return [k for k, _ in model.named_parameters()]


def stack(states: Sequence[State], name: str) -> torch.Tensor:
    """(N, *shape) float64 stack of one entry of every state."""
    return torch.stack([s[name].to(torch.float64) for s in states])


def average(states: Sequence[State], name: str) -> torch.Tensor:
    if not states[0][name].is_floating_point():
        return states[0][name].clone()
    return stack(states, name).mean(0)


def task_arithmetic(states: Sequence[State], base: State, name: str, scaling: float) -> torch.Tensor:
    """θ₀ + λ Σᵢ (θᵢ − θ₀) in float64."""
    theta0 = base[name].to(torch.float64)
    return theta0 + scaling * (stack(states, name) - theta0).sum(0)


def fallback(states: Sequence[State], base: State | None, name: str, scaling: float | None) -> torch.Tensor:
    """The rule for whatever a method has no statistic for: task arithmetic with λ=``scaling`` when
    a base is given and ``scaling`` is set, else the plain average (= task arithmetic with λ = 1/N)."""
    if base is None or scaling is None or not states[0][name].is_floating_point():
        return average(states, name)
    return task_arithmetic(states, base, name, scaling)


def buffers_rule(states: Sequence[State], params: Iterable[str]) -> State:
    """Averaged float buffers / copied integer buffers: every state entry that is not in ``params``."""
    params = set(params)
    return {k: average(states, k) for k in states[0] if k not in params}


def build(template: nn.Module, merged: State) -> nn.Module:
    """A deep copy of ``template`` carrying ``merged`` (cast back to each entry's dtype)."""
    model = copy.deepcopy(template)
    own = model.state_dict()
    missing = [k for k in own if k not in merged]
    if missing:
        raise RuntimeError(f"internal: merged state lacks {missing[:3]}")
    model.load_state_dict({k: merged[k].to(own[k].dtype) for k in own})
    return model


def check_scaling(value: float | None, name: str = "scaling", allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not torch.isfinite(torch.tensor(value))
    ):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def layer_matrix(state: State, layer: str) -> torch.Tensor:
    """The layer's [W | b] as (out, fan_in[+1]) float64, the layout of the Gram / K-FAC statistics."""
    w = state[f"{layer}.weight"].to(torch.float64).flatten(1)
    bias = state.get(f"{layer}.bias")
    return w if bias is None else torch.cat([w, bias.to(torch.float64)[:, None]], 1)


def split_layer_matrix(matrix: torch.Tensor, state: State, layer: str) -> State:
    """Inverse of :func:`layer_matrix`: the weight (and bias) entries of ``layer``."""
    shape = state[f"{layer}.weight"].shape
    fan_in = shape[1:].numel()
    out = {f"{layer}.weight": matrix[:, :fan_in].reshape(shape)}
    if f"{layer}.bias" in state:
        out[f"{layer}.bias"] = matrix[:, fan_in]
    return out


def layer_params(state: State, layer: str) -> list[str]:
    return [k for k in (f"{layer}.weight", f"{layer}.bias") if k in state]


def check_count_list(field: str, values: Sequence, n: int, method: str) -> None:
    if len(values) != n:
        raise ValueError(
            f"{method}: statistics {field!r} cover {len(values)} models but {n} sources were given; "
            f"gather them for exactly these sources"
        )


def check_layer_stat(method: str, field: str, i: int, layer: str, stat: torch.Tensor, expected: int) -> None:
    if stat.shape[-1] != expected:
        raise ValueError(
            f"{method}: statistics {field!r} of model {i} at layer {layer!r} have size {stat.shape[-1]}, "
            f"but the layer's [W | b] has {expected} input columns; were they gathered on another model?"
        )


#: Statistics kept per model (one entry per source), so each source's can come from its own data.
PER_MODEL_STATISTICS: tuple[str, ...] = ("grams", "fisher", "kfac")


def own_task_statistics(
    sources: Sequence[nn.Module],
    loaders: Sequence[Iterable[Any]],
    requires: Sequence[str] = PER_MODEL_STATISTICS,
    *,
    progress: bool = False,
) -> Statistics:
    """Each source's statistics gathered on its *own* loader, side by side in one container.

    Why: the owner of a model fine-tuned on one task usually holds that task's data only, which is
    the setting RegMean, Fisher merging and MaTS are published in; one calibration set shared by all
    sources (what the pipeline's statistics pass uses) is a different setting. Only per-model statistics
    (:data:`PER_MODEL_STATISTICS`) can be gathered this way; the same-base methods need no graph.
    """
    names = _check_own_task_inputs(sources, loaders, requires)
    graph = MergeGraph(spaces=[], taps=[], cut_points=[], param_shapes={})
    parts = [
        collect_statistics([model], graph, loader, requires=names, progress=progress)
        for model, loader in zip(sources, loaders, strict=True)
    ]
    stats = Statistics(num_models=len(sources), graph_digest=graph.digest())
    for name in names:
        first = parts[0][name]
        joined = {
            f.name: [x for p in parts for x in getattr(p[name], f.name)] for f in dataclasses.fields(first)
        }
        stats[name] = type(first)(**joined)
    return stats


def _check_own_task_inputs(
    sources: Sequence[nn.Module], loaders: Sequence[Iterable[Any]], requires: Sequence[str]
) -> list[str]:
    """The requested statistic names, after checking one loader per source and per-model names only."""
    if len(loaders) != len(sources):
        raise ValueError(
            f"own_task_statistics needs one loader per source: got {len(sources)} sources and "
            f"{len(loaders)} loaders"
        )
    names = list(requires)
    if not names:
        raise ValueError(f"requires is empty: name some of {list(PER_MODEL_STATISTICS)}")
    bad = [n for n in names if n not in PER_MODEL_STATISTICS]
    if bad:
        raise ValueError(
            f"own_task_statistics gathers only per-model statistics {list(PER_MODEL_STATISTICS)}; "
            f"{bad[0]!r} is joint over the models or unknown"
        )
    return names
