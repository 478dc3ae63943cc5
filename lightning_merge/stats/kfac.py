"""K-FAC factors of every Linear / Conv2d layer (MaTS "kfac" subspace).

For a layer y = W a (a: the augmented input row of :func:`~lightning_merge.stats.patch_gram.input_gram`),
the Fisher block of ``[W | b]`` is approximated by A ⊗ G with ``A = Σ a aᵀ`` over inputs and
``G = Σ g gᵀ`` over the gradients g = ∂ log p(ŷ|x)/∂y of the log-likelihood of the model's own
prediction ŷ (conv: every output position gives one a and one g). One backward of the *sum* of the
per-sample log-likelihoods yields every sample's own output gradient at every layer, because in
eval mode samples do not interact. A ⊗ G is never formed: MaTS applies V ↦ G V A.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_merge.dataflow import model_device
from lightning_merge.stats.collector import (
    StatisticCollector,
    SumStates,
    check_per_model,
    check_square,
    split_per_model,
)
from lightning_merge.stats.container import KFACStatistics
from lightning_merge.stats.fisher import Target, check_eval_mode, check_target, model_targets
from lightning_merge.stats.gram import _LayerHooks, layer_input_dim
from lightning_merge.stats.patch_gram import input_gram, with_bias_column
from lightning_merge.stats.registry import register_statistic


def output_rows(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Output gradients as rows (R, out) in float64: conv positions and token positions are rows."""
    if isinstance(module, nn.Conv2d):
        g = g.movedim(1, -1)
    return g.reshape(-1, g.shape[-1]).to(torch.float64)


@register_statistic
class KFACCollector(StatisticCollector):
    """Accumulates ``kfac[i][layer] = (A, G)`` and the number of samples per model.

    Its value is a :class:`KFACStatistics`, saved as ``kfac/<i>/<layer>/{A,G}`` with the sample
    counts in the sidecar.
    """

    name = "kfac"

    def __init__(self, target: Target = "argmax") -> None:
        check_target(target)
        self.target: Target = target
        self._hooks = _LayerHooks()
        self._outputs: list[tuple[str, nn.Module, torch.Tensor]] = []
        self.inputs: list[SumStates] = []  # A factors per model
        self.grads: list[SumStates] = []  # G factors per model
        self.counts = SumStates({})

    def attach(self, models: Sequence[nn.Module]) -> None:
        self._hooks.attach(models, self._record)
        self.inputs, self.grads = [], []
        for model, layers in zip(models, self._hooks.layers, strict=True):
            device = model_device(model)
            self.inputs.append(SumStates({k: (layer_input_dim(m),) * 2 for k, m in layers.items()}, device))
            self.grads.append(SumStates({k: (m.weight.shape[0],) * 2 for k, m in layers.items()}, device))
        self.counts = SumStates({str(i): () for i in range(len(models))}, model_device(models[0]))

    def detach(self) -> None:
        self._hooks.detach()

    def _record(self, i: int, name: str, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        xx, xs, rows = input_gram(module, x.detach())
        self.inputs[i].update(name, with_bias_column(module, xx, xs, rows))
        self._outputs.append((name, module, out))

    def _step_model(self, i: int, model: nn.Module, x: torch.Tensor) -> None:
        self._outputs = []
        self._hooks.active = True
        try:
            logits = model(x)
        finally:
            self._hooks.active = False
        y = model_targets(logits.detach(), self.target)
        total = torch.log_softmax(logits, -1).gather(1, y[:, None]).sum()
        grads = torch.autograd.grad(total, [o for _, _, o in self._outputs], allow_unused=True)
        for (name, module, out), g in zip(self._outputs, grads, strict=True):
            rows = output_rows(module, g if g is not None else torch.zeros_like(out))
            self.grads[i][name].addmm_(rows.T, rows)
        self._outputs = []
        self.counts.update(str(i), x.shape[0])

    def step(self, models: Sequence[nn.Module], inputs: torch.Tensor) -> None:
        check_eval_mode(models, "KFACCollector")
        with torch.enable_grad():
            x = inputs.detach().requires_grad_(True)  # every layer output is then in the graph
            for i, model in enumerate(models):
                self._step_model(i, model, x)

    def states(self) -> list[torch.Tensor]:
        return [t for metric in (*self.inputs, *self.grads, self.counts) for t in metric.states()]

    def result(self) -> KFACStatistics:
        factors = [
            {k: (a.clone(), g[k].clone()) for k, a in inputs.compute().items()}
            for inputs, g in zip(self.inputs, self.grads, strict=True)
        ]
        return KFACStatistics(factors=factors, counts=[float(c) for c in self.counts.compute().values()])

    @classmethod
    def to_tensors(cls, value: KFACStatistics) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {}
        for i, per in enumerate(value.factors):
            for layer, (a, g) in per.items():
                tensors |= {f"{i}/{layer}/A": a, f"{i}/{layer}/G": g}
        return tensors, {"counts": value.counts}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: Any, num_models: int) -> KFACStatistics:
        counts = meta["counts"]
        halves = split_per_model(tensors, len(counts))
        factors = [
            {key[:-2]: (per[key], per[key[:-1] + "G"]) for key in per if key.endswith("/A")} for per in halves
        ]
        return KFACStatistics(factors=factors, counts=counts)

    @classmethod
    def check(cls, value: Any, num_models: int) -> None:
        if not isinstance(value, KFACStatistics):
            raise ValueError(f"statistics 'kfac' is a {type(value).__name__}, expected KFACStatistics")
        check_per_model("kfac", "kfac", value.factors, num_models)
        check_per_model("kfac", "kfac_counts", value.counts, num_models)
        for i, per in enumerate(value.factors):
            for layer, pair in per.items():
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise ValueError(
                        f"statistics 'kfac' of model {i} at layer {layer!r} is not an (A, G) pair"
                    )
                check_square("kfac", f"A of model {i} at layer {layer!r}", pair[0])
                check_square("kfac", f"G of model {i} at layer {layer!r}", pair[1])
