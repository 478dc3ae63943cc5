"""Gram, diagonal-Fisher and K-FAC collectors against direct, independently written references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_merge.graph.spec import MergeGraph
from lightning_merge.stats.collect import collect_statistics
from lightning_merge.stats.collector import Collector
from lightning_merge.stats.container import Statistics
from lightning_merge.stats.fisher import FisherCollector, per_sample_sq_grads_loop, per_sample_sq_grads_vmap
from lightning_merge.stats.gram import GramCollector
from lightning_merge.stats.kfac import KFACCollector


class ConvNet(nn.Module):
    """Strided zero-padded conv, a bias-free reflect-padded conv, BatchNorm, and a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 2, padding=1, padding_mode="reflect", bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 5 * 5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.bn(self.conv2(x)))
        return self.fc(x.flatten(1))


LAYERS = ("conv1", "conv2", "fc")


def make_models(n: int = 2) -> list[nn.Module]:
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        m = ConvNet().double()
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        models.append(m.eval())
    return models


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(5, 2, 7, 7, generator=g, dtype=torch.float64) for _ in range(2)]


def run(collector: Collector, models: list[nn.Module]) -> Statistics:
    collector.attach(models)
    for x in batches():
        collector.step(models, x)
    collector.detach()
    stats = Statistics(num_models=len(models), graph_digest="")
    collector.fill(stats)
    return stats


def reference_patches(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Patch rows by explicit slicing (no unfold): row = (C, kh, kw) window of one output position."""
    p = conv.padding[0]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, (p, p, p, p), mode=mode)
    k, s = conv.kernel_size[0], conv.stride[0]
    out = (xp.shape[-1] - k) // s + 1
    rows = [
        xp[:, :, i * s : i * s + k, j * s : j * s + k].reshape(x.shape[0], -1)
        for i in range(out)
        for j in range(out)
    ]
    return torch.stack(rows, 1).reshape(-1, rows[0].shape[1])  # (B·L, C·k·k), batch-major


def layer_inputs_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [
        getattr(model, n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, (a[0], o)))
        for n in LAYERS
    ]
    model(x)
    for h in handles:
        h.remove()
    return seen


def augmented_rows(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    layer = getattr(model, name)
    rows = reference_patches(layer, x) if isinstance(layer, nn.Conv2d) else x
    if layer.bias is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
    return rows


def test_reference_patches_match_the_weight_layout() -> None:
    """The reference itself is right: rows @ W.flatten(1)ᵀ (+ b) reproduces the conv output."""
    model = make_models(1)[0]
    x = batches()[0]
    for name in ("conv1", "conv2"):
        inp, out = layer_inputs_outputs(model, x)[name]
        layer = getattr(model, name)
        rows = augmented_rows(model, name, inp)
        w = layer.weight.flatten(1)
        if layer.bias is not None:
            w = torch.cat([w, layer.bias[:, None]], 1)
        expected = out.movedim(1, -1).reshape(-1, out.shape[1])
        torch.testing.assert_close(rows @ w.T, expected)


def test_gram_collector_equals_direct_xtx() -> None:
    models = make_models(2)
    stats = run(GramCollector(), models)
    assert len(stats.grams) == 2
    for i, model in enumerate(models):
        assert sorted(stats.grams[i]) == sorted(LAYERS)
        for name in LAYERS:
            rows = torch.cat(
                [augmented_rows(model, name, layer_inputs_outputs(model, x)[name][0]) for x in batches()]
            )
            torch.testing.assert_close(stats.grams[i][name], rows.T @ rows, rtol=1e-12, atol=1e-10)
            assert stats.gram_counts[i][name] == rows.shape[0]
    # the bias column: conv1 has a bias (C·k·k + 1 = 19), conv2 has none (3·2·2 = 12)
    assert stats.grams[0]["conv1"].shape == (19, 19) and stats.grams[0]["conv2"].shape == (12, 12)
    assert stats.gram_counts[0]["conv1"] == 10 * 16 and stats.gram_counts[0]["fc"] == 10


def test_gram_hooks_ignore_foreign_forwards_and_detach() -> None:
    models = make_models(2)
    collector = GramCollector()
    collector.attach(models)
    models[0](batches()[0])  # another collector's forward: must not be counted
    assert all(float(c) == 0 for c in collector.counts[0].values())
    collector.step(models, batches()[0])
    before = [t.clone() for t in collector.states()]
    collector.detach()
    collector._hooks.active = True
    models[0](batches()[1])
    assert all(torch.equal(a, b) for a, b in zip(before, collector.states(), strict=True))
    assert len(collector.states()) == 2 * 2 * len(LAYERS)


def reference_fisher(model: nn.Module) -> dict[str, torch.Tensor]:
    """Σ over samples of the squared gradient of log p(argmax | x), one autograd call per sample."""
    total = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
    for x in batches():
        for b in range(x.shape[0]):
            logits = model(x[b : b + 1])
            logp = torch.log_softmax(logits, -1)[0, logits[0].argmax()]
            grads = torch.autograd.grad(logp, list(model.parameters()))
            for (k, _), g in zip(model.named_parameters(), grads, strict=True):
                total[k] += g.square()
    return total


def test_fisher_collector_equals_per_sample_autograd_loop() -> None:
    models = make_models(2)
    stats = run(FisherCollector(chunk_size=3), models)
    assert stats.fisher_counts == [10.0, 10.0]
    for i, model in enumerate(models):
        ref = reference_fisher(model)
        assert sorted(stats.fisher[i]) == sorted(ref)
        for k in ref:
            torch.testing.assert_close(stats.fisher[i][k], ref[k], rtol=1e-10, atol=1e-14)


def reference_kfac(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A and G per layer from one forward/backward per sample (autograd.grad w.r.t. every layer output)."""
    out = {n: [0.0, 0.0] for n in LAYERS}
    for x in batches():
        for b in range(x.shape[0]):
            seen = layer_inputs_outputs(model, x[b : b + 1])
            outs = [seen[n][1] for n in LAYERS]
            logits = outs[-1]  # fc is the last layer: its output is the logits
            logp = torch.log_softmax(logits, -1)[0, logits[0].argmax()]
            grads = torch.autograd.grad(logp, outs)
            for n, g in zip(LAYERS, grads, strict=True):
                rows = augmented_rows(model, n, seen[n][0])
                grow = g.movedim(1, -1).reshape(-1, g.shape[1])
                out[n][0] = out[n][0] + rows.T @ rows
                out[n][1] = out[n][1] + grow.T @ grow
    return {n: (a, g) for n, (a, g) in out.items()}


def test_kfac_collector_equals_per_sample_loop() -> None:
    models = make_models(2)
    stats = run(KFACCollector(), models)
    assert stats.kfac_counts == [10.0, 10.0]
    for i, model in enumerate(models):
        ref = reference_kfac(model)
        for n in LAYERS:
            a, g = stats.kfac[i][n]
            torch.testing.assert_close(a, ref[n][0], rtol=1e-12, atol=1e-10)
            torch.testing.assert_close(g, ref[n][1], rtol=1e-10, atol=1e-14)
    assert stats.kfac[0]["conv2"][1].shape == (4, 4)


def test_collect_statistics_pass_builds_these_collectors() -> None:
    """The shared statistics pass finds the collectors by name and gives the same sums."""
    models = make_models(2)
    graph = MergeGraph(spaces=[], taps=[], cut_points=[], param_shapes={})
    stats = collect_statistics(models, graph, batches(), requires=["grams", "fisher", "kfac"], progress=False)
    direct = run(GramCollector(), models)
    torch.testing.assert_close(stats.grams[1]["fc"], direct.grams[1]["fc"])
    torch.testing.assert_close(
        stats.fisher[0]["conv1.weight"], run(FisherCollector(), models).fisher[0]["conv1.weight"]
    )
    torch.testing.assert_close(stats.kfac[1]["conv1"][1], run(KFACCollector(), models).kfac[1]["conv1"][1])


@pytest.mark.parametrize("cls", [FisherCollector, KFACCollector])
def test_batchnorm_in_train_mode_is_refused(cls: type) -> None:
    models = make_models(2)
    models[1].train()
    collector = cls()
    collector.attach(models)
    with pytest.raises(ValueError, match=r"model 1 has BatchNorm 'bn' in training mode"):
        collector.step(models, batches()[0])


@pytest.mark.parametrize("cls", [FisherCollector, KFACCollector])
def test_bad_target_is_refused(cls: type) -> None:
    with pytest.raises(ValueError, match="target must be 'argmax' or 'sample'"):
        cls(target="mode")


def test_sampled_targets_give_a_different_fisher() -> None:
    models = make_models(1)
    torch.manual_seed(0)
    sampled = run(FisherCollector(target="sample"), models)
    argmax = run(FisherCollector(), models)
    assert sampled.fisher_counts == [10.0]
    assert not torch.allclose(sampled.fisher[0]["fc.weight"], argmax.fisher[0]["fc.weight"])


def test_fisher_loop_fallback_matches_vmap_and_ignores_requires_grad() -> None:
    """The per-sample loop (for models vmap cannot batch) gives the vmapped sums, frozen or not."""
    model = make_models(1)[0].requires_grad_(False)
    x = batches()[0]
    y = model(x).argmax(-1)
    looped = per_sample_sq_grads_loop(model, x, y)
    vmapped = per_sample_sq_grads_vmap(model, x, y)
    for k, v in vmapped.items():
        torch.testing.assert_close(looped[k], v, rtol=1e-10, atol=1e-14)
    assert looped["fc.weight"].abs().sum() > 0
