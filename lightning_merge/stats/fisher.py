"""Diagonal Fisher of every parameter at the model's own predictions (Fisher merging, MaTS).

``F[p] = Σ_samples (∂ log p(ŷ|x) / ∂p)²`` where ŷ is the model's own prediction (argmax, or drawn
from its softmax). The square is taken *per sample* — the square of a batch-mean gradient would
be a much smaller, different quantity — using ``torch.func.vmap(grad(...))`` over the batch, with
a loop of per-sample functional gradients as the fallback when a model does not vmap
(data-dependent control flow, unsupported ops). Models must be in eval mode: a BatchNorm in
training mode couples the samples of a batch (so "per sample" has no meaning) and would update
the sources' running stats.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_merge.dataflow import model_device
from lightning_merge.stats.collector import StatisticCollector, SumStates, check_per_model, split_per_model
from lightning_merge.stats.container import FisherStatistics
from lightning_merge.stats.registry import register_statistic

log = logging.getLogger(__name__)

Target = Literal["argmax", "sample"]


def model_targets(logits: torch.Tensor, target: Target) -> torch.Tensor:
    """The labels the Fisher is taken at: the model's own argmax, or a draw from its softmax."""
    if logits.ndim != 2:
        raise ValueError(f"Fisher/K-FAC need (batch, classes) logits, got shape {tuple(logits.shape)}")
    if target == "argmax":
        return logits.argmax(-1)
    return torch.multinomial(torch.softmax(logits.double(), -1), 1).squeeze(-1)


def check_target(target: str) -> None:
    if target not in ("argmax", "sample"):
        raise ValueError(f"target must be 'argmax' or 'sample', got {target!r}")


def check_eval_mode(models: Sequence[nn.Module], what: str) -> None:
    """Raise when a model has a BatchNorm in training mode (samples would not be independent)."""
    for i, model in enumerate(models):
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                raise ValueError(
                    f"{what}: model {i} has BatchNorm {name!r} in training mode; per-sample gradients "
                    f"need independent samples — call model.eval() before gathering statistics"
                )


def _log_likelihood_fn(model: nn.Module) -> Callable[..., torch.Tensor]:
    """(params, x, y) ↦ log p(y | x) of one sample, functional in the parameters."""
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def log_lik(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xb.unsqueeze(0),))
        return torch.log_softmax(out, -1)[0].gather(0, yb.unsqueeze(0)).squeeze(0)

    return log_lik


def per_sample_sq_grads_vmap(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk_size: int | None = None
) -> dict[str, torch.Tensor]:
    """Σ_b (∇_θ log p(y_b | x_b))² per parameter, one vmapped gradient per sample."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    grads = vmap(grad(_log_likelihood_fn(model)), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, x, y)
    return {k: g.double().square().sum(0) for k, g in grads.items()}


def per_sample_sq_grads_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Same sums as :func:`per_sample_sq_grads_vmap`, one functional gradient per sample: for models
    vmap cannot batch (data-dependent control flow); frozen parameters are differentiated too."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    grad_fn = grad(_log_likelihood_fn(model))
    total = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    for b in range(x.shape[0]):
        for k, g in grad_fn(params, x[b], y[b]).items():
            total[k] += g.double().square()
    return total


@register_statistic
class FisherCollector(StatisticCollector):
    """Accumulates ``fisher[i][param]`` (summed squared per-sample gradients) and the sample count.

    Its value is a :class:`FisherStatistics`, saved as ``fisher/<i>/<param>`` with the sample
    counts in the sidecar.
    """

    name = "fisher"

    def __init__(self, target: Target = "argmax", chunk_size: int | None = None) -> None:
        check_target(target)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.target: Target = target
        self.chunk_size = chunk_size
        self.fisher: list[SumStates] = []
        self.counts = SumStates({})

    def attach(self, models: Sequence[nn.Module]) -> None:
        self.fisher = [
            SumStates({k: p.shape for k, p in m.named_parameters()}, model_device(m)) for m in models
        ]
        self.counts = SumStates({str(i): () for i in range(len(models))}, model_device(models[0]))

    def detach(self) -> None:
        """No hooks to remove: the Fisher is computed functionally."""

    def step(self, models: Sequence[nn.Module], inputs: torch.Tensor) -> None:
        check_eval_mode(models, "FisherCollector")
        with torch.enable_grad():
            x = inputs
            for i, model in enumerate(models):
                with torch.no_grad():
                    y = model_targets(model(x), self.target)
                try:
                    sq = per_sample_sq_grads_vmap(model, x, y, self.chunk_size)
                except RuntimeError as err:  # a model torch.func cannot vmap: same sums, one by one
                    log.warning("Fisher for model %d falls back to a per-sample loop: %s", i, err)
                    sq = per_sample_sq_grads_loop(model, x, y)
                for k, v in sq.items():
                    self.fisher[i].update(k, v)
                self.counts.update(str(i), x.shape[0])

    def states(self) -> list[torch.Tensor]:
        return [t for metric in (*self.fisher, self.counts) for t in metric.states()]

    def result(self) -> FisherStatistics:
        return FisherStatistics(
            sums=[{k: v.clone() for k, v in f.compute().items()} for f in self.fisher],
            counts=[float(c) for c in self.counts.compute().values()],
        )

    @classmethod
    def to_tensors(cls, value: FisherStatistics) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {f"{i}/{param}": f for i, per in enumerate(value.sums) for param, f in per.items()}
        return tensors, {"counts": value.counts}

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, torch.Tensor], meta: Any, num_models: int
    ) -> FisherStatistics:
        counts = meta["counts"]
        return FisherStatistics(sums=split_per_model(tensors, len(counts)), counts=counts)

    @classmethod
    def check(cls, value: Any, num_models: int) -> None:
        if not isinstance(value, FisherStatistics):
            raise ValueError(f"statistics 'fisher' is a {type(value).__name__}, expected FisherStatistics")
        check_per_model("fisher", "fisher", value.sums, num_models)
        check_per_model("fisher", "fisher_counts", value.counts, num_models)
        for i, sums in enumerate(value.sums):
            for param, f in sums.items():
                if not isinstance(f, torch.Tensor):
                    raise ValueError(f"statistics 'fisher' of model {i} at {param!r} is a {type(f).__name__}")
