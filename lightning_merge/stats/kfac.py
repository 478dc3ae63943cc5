"""K-FAC factors of every Linear / Conv2d layer (MaTS "kfac" subspace).

For a layer y = W a (a: the augmented input row of :func:`~lightning_merge.stats.patch_gram.input_gram`),
the Fisher block of ``[W | b]`` is approximated by A ⊗ G with ``A = Σ a aᵀ`` over inputs and
``G = Σ g gᵀ`` over the gradients g = ∂ log p(ŷ|x)/∂y of the log-likelihood of the model's own
prediction ŷ (conv: every output position gives one a and one g). One backward of the *sum* of the
per-sample log-likelihoods yields every sample's own output gradient at every layer, because in
eval mode samples do not interact. A ⊗ G is never formed: MaTS applies V ↦ G V A.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_merge.dataflow import model_device
from lightning_merge.graph.spec import MergeGraph
from lightning_merge.stats.collect import register_collector
from lightning_merge.stats.container import Statistics
from lightning_merge.stats.fisher import Target, check_eval_mode, check_target, model_targets
from lightning_merge.stats.gram import _LayerHooks, layer_input_dim
from lightning_merge.stats.patch_gram import input_gram, with_bias_column


def output_rows(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Output gradients as rows (R, out) in float64: conv positions and token positions are rows."""
    if isinstance(module, nn.Conv2d):
        g = g.movedim(1, -1)
    return g.reshape(-1, g.shape[-1]).to(torch.float64)


class KFACCollector:
    """Accumulates ``kfac[i][layer] = (A, G)`` and the number of samples per model."""

    name = "kfac"

    def __init__(self, target: Target = "argmax") -> None:
        check_target(target)
        self.target: Target = target
        self._hooks = _LayerHooks()
        self._outputs: list[tuple[str, nn.Module, torch.Tensor]] = []
        self.factors: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        self.counts: list[torch.Tensor] = []

    def attach(self, models: Sequence[nn.Module]) -> None:
        self._hooks.attach(models, self._record)
        self.factors, self.counts = [], []
        for model, layers in zip(models, self._hooks.layers, strict=True):
            per = {}
            for name, module in layers.items():
                d, dev = layer_input_dim(module), module.weight.device
                out = module.weight.shape[0]
                per[name] = (
                    torch.zeros(d, d, dtype=torch.float64, device=dev),
                    torch.zeros(out, out, dtype=torch.float64, device=dev),
                )
            self.factors.append(per)
            device = model_device(model)
            self.counts.append(torch.zeros((), dtype=torch.float64, device=device))

    def detach(self) -> None:
        self._hooks.detach()

    def _record(self, i: int, name: str, module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        xx, xs, rows = input_gram(module, x.detach())
        self.factors[i][name][0].add_(with_bias_column(module, xx, xs, rows))
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
            self.factors[i][name][1].addmm_(rows.T, rows)
        self._outputs = []
        self.counts[i] += x.shape[0]

    def step(self, models: Sequence[nn.Module], inputs: torch.Tensor) -> None:
        check_eval_mode(models, "KFACCollector")
        with torch.enable_grad():
            x = inputs.detach().requires_grad_(True)  # every layer output is then in the graph
            for i, model in enumerate(models):
                self._step_model(i, model, x)

    def states(self) -> list[torch.Tensor]:
        return [t for per in self.factors for pair in per.values() for t in pair] + list(self.counts)

    def fill(self, stats: Statistics) -> None:
        stats.kfac = [{k: (a.clone(), g.clone()) for k, (a, g) in f.items()} for f in self.factors]
        stats.kfac_counts = [float(c) for c in self.counts]


@register_collector("kfac")
def _build(graph: MergeGraph) -> KFACCollector:
    """Per-layer / per-parameter statistics need no merge graph: every supported module is observed."""
    return KFACCollector()
