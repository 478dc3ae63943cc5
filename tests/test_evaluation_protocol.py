"""The papers' evaluation protocol: equally treated references, ZipIt!'s per-head softmax rule in exact
log space, and costs counted on nonzero weights only."""

from __future__ import annotations

import copy
import itertools

import mpmath
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from trained import quiet_trainer

from lightning_merge.apply.batchnorm_reset import reset_batchnorm
from lightning_merge.cost import Cost, cost, count_flops, count_params
from lightning_merge.data import MergeDataModule, TaskSplitDataModule
from lightning_merge.evaluation import (
    COSINE_SCALE,
    MergeScores,
    SideBySide,
    SourceHead,
    cosine_forward,
    ensemble_scores,
    evaluate_model,
    merged_scores,
    per_head_log_softmax,
)
from lightning_merge.methods import AverageMerge
from lightning_merge.models import SourceClassifier
from lightning_merge.models.heads import EmbeddingHead
from lightning_merge.module import MergeModule
from lightning_merge.pipeline.merge import ReferenceOptions, treat_references
from lightning_merge.pipeline.prepare import PreparedSources

HEADS = [SourceHead("linear", (0, 1, 2), 6), SourceHead("linear", (3, 4, 5), 6)]


# --------------------------------------------------------------------------- per-head softmax
def _mp_log_softmax(row: list[float]) -> list[float]:
    """log-softmax of the finite entries of ``row`` to 500 digits (mpmath): tiny ones survive."""
    with mpmath.workdps(500):
        finite = [mpmath.mpf(v) for v in row if v != float("-inf")]
        log_z = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in finite))
        return [float("-inf") if v == float("-inf") else float(mpmath.mpf(v) - log_z) for v in row]


def test_per_head_log_softmax_equals_a_high_precision_reference() -> None:
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(64, 7, generator=g, dtype=torch.float64) * 400 - 200).float()
    scores[torch.rand(64, 7, generator=g) < 0.4] = float("-inf")
    scores[:, 0] = scores[:, 0].nan_to_num(neginf=5.0)  # every head scores at least one class
    scores[:8, 1:] = scores[:8, :1] - torch.arange(1, 7) * 0.5  # close calls too
    out = per_head_log_softmax(scores)
    expected = torch.tensor([_mp_log_softmax(r) for r in scores.double().tolist()], dtype=torch.float64)
    assert out.dtype == torch.float64
    assert torch.equal(torch.isinf(out), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(out[finite], expected[finite], rtol=1e-12, atol=0)


def test_per_head_softmax_never_ties_where_a_float32_softmax_saturates() -> None:
    """Two 3-class heads, each sure of its top class by ``m0`` / ``m1`` nats (cosine × 100 spans ≤ 200):
    float32 softmax gives both tops exactly 1.0 (the tie goes to head 0), the log-space rule ranks the
    heads as exact arithmetic does."""
    margins = [20.0, 35.5, 60.0, 99.0, 150.0, 199.0]
    for m0, m1 in itertools.permutations(margins, 2):
        a = torch.tensor([[0.0, -m0, -m0 - 3.0]])
        b = torch.tensor([[-m1 - 1.0, 0.0, -m1]])
        saturated = torch.cat([a.softmax(-1), b.softmax(-1)], -1)
        assert saturated[0, 0] == 1.0 and saturated[0, 4] == 1.0  # the construction saturates float32
        assert saturated.argmax(-1).item() == 0  # ZipIt!'s float32 rule: head 0 wins every tie
        pred = ensemble_scores([a, b], HEADS, "per_head_softmax").argmax(-1).item()
        exact = [_mp_log_softmax(a[0].tolist())[0], _mp_log_softmax(b[0].tolist())[1]]
        assert exact[0] != exact[1]
        assert pred == (0 if exact[0] > exact[1] else 4) == (0 if m0 > m1 else 4)


def test_per_head_softmax_ranks_heads_by_probability_not_by_logit() -> None:
    a = torch.tensor([[9.0, 8.9, 0.0]])  # highest logit, but a close call within its head
    b = torch.tensor([[0.0, 5.0, 0.0]])  # lower logit, a sure head
    assert ensemble_scores([a, b], HEADS, "logits").argmax(-1).item() == 0
    assert ensemble_scores([a, b], HEADS, "per_head_softmax").argmax(-1).item() == 4


def test_cosine_forward_gives_zipit_cosine_scores_that_logits_alone_cannot() -> None:
    torch.manual_seed(0)
    head = EmbeddingHead(16, num_classes=10, embed_dim=32)
    x = torch.randn(8, 16)
    z = head.proj(x).double()
    expected = COSINE_SCALE * F.normalize(z, dim=-1) @ F.normalize(head.classes.weight.double(), dim=-1).T
    cos = cosine_forward(head, x)
    torch.testing.assert_close(cos.double(), expected, rtol=1e-5, atol=1e-4)
    logits = head(x)  # the hook is gone: plain logits again
    assert torch.equal(cos.argmax(-1), logits.argmax(-1))  # one shared head: same prediction
    # the logits' own norm is not ‖z‖ (orthonormal rows in a wider space): the embedding is needed
    assert (logits.norm(dim=-1) < head.proj(x).norm(dim=-1) - 1e-3).all()


@pytest.mark.parametrize("scoring", ["logits", "per_head_softmax"])
def test_side_by_side_concatenation_scores_as_the_ensemble(scoring: str) -> None:
    torch.manual_seed(1)
    models = [nn.Linear(4, 3), nn.Linear(4, 3)]
    x = torch.randn(10, 4)
    together = merged_scores(SideBySide(models)(x), HEADS, scoring)
    assert torch.equal(together, ensemble_scores([m(x) for m in models], HEADS, scoring))
    concatenated = merged_scores(torch.cat([m(x) for m in models], -1), HEADS, scoring)
    assert torch.equal(concatenated, together)  # linear heads side by side: the same rule
    three = [SourceHead("linear", (c, c + 1), 6) for c in (0, 2, 4)]
    outs = [torch.randn(10, 2) for _ in three]
    joint = ensemble_scores(outs, three, scoring)
    per_head = [o.log_softmax(-1).double() if scoring == "per_head_softmax" else o for o in outs]
    torch.testing.assert_close(joint, torch.cat(per_head, -1), rtol=1e-6, atol=1e-6)


def test_scoring_options_are_checked() -> None:
    with pytest.raises(ValueError, match="scoring must be one of"):
        MergeScores(HEADS, [[0, 1, 2], [3, 4, 5]], scoring="softmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="treated_references must be one of"):
        ReferenceOptions(treat="both")  # type: ignore[arg-type]
    scores = MergeScores(HEADS, [[0, 1, 2], [3, 4, 5]], treated_ensemble=True)
    with pytest.raises(ValueError, match="treated sources' outputs"):
        scores.update(torch.zeros(2, 6), [torch.zeros(2, 3)] * 2, torch.zeros(2, dtype=torch.long), 0)


# --------------------------------------------------------------------------- reference treatment
def _bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))


def test_treat_references_resets_copies_and_leaves_the_sources_alone() -> None:
    torch.manual_seed(2)
    sources = [_bn_net().eval(), _bn_net().eval()]
    before = [copy.deepcopy(s.state_dict()) for s in sources]
    data = [(torch.randn(16, 1, 8, 8) * 3 + 1, torch.zeros(16)) for _ in range(3)]
    treated = treat_references(sources, data, True)
    for src, state, copied in zip(sources, before, treated, strict=True):
        assert copied is not src and not copied.training
        assert all(torch.equal(v, state[k]) for k, v in src.state_dict().items())  # untouched
        by_hand = reset_batchnorm(copy.deepcopy(src), data)
        assert all(torch.equal(v, by_hand.state_dict()[k]) for k, v in copied.state_dict().items())
        assert not torch.equal(copied[1].running_mean, src[1].running_mean)
    untouched = treat_references(sources, data, False)
    assert all(torch.equal(v, before[0][k]) for k, v in untouched[0].state_dict().items())
    with pytest.raises(ValueError, match="repair must be"):
        treat_references(sources, data, "bn")  # type: ignore[arg-type]


def test_references_reuse_already_reset_sources_and_name_a_count_mismatch() -> None:
    torch.manual_seed(3)
    sources = [_bn_net().eval(), _bn_net().eval()]
    prepared = PreparedSources(sources, ["a", "b"], HEADS, [], None, None)
    data = [(torch.randn(8, 1, 8, 8), torch.zeros(8))]
    options, tasks = ReferenceOptions(), [[0, 1, 2], [3, 4, 5]]
    reset = [reset_batchnorm(copy.deepcopy(s), data) for s in sources]
    _, treated = options.of(prepared, sources[0], tasks, data, True, already_reset=reset)
    assert all(a is b for a, b in zip(treated, reset, strict=True))  # used as given, no second reset
    with pytest.raises(ValueError, match="1 reset sources for 2 sources"):
        options.of(prepared, sources[0], tasks, data, True, already_reset=reset[:1])


def _validate(module: MergeModule, dm: TaskSplitDataModule) -> MergeModule:
    quiet_trainer(limit_val_batches=2).validate(module, datamodule=MergeDataModule(dm), verbose=False)
    return module


def _first_batches(dm: TaskSplitDataModule, count: int = 2) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    return [list(itertools.islice(dm.task_test_dataloader(t), count)) for t in range(dm.num_tasks)]


def _untrained(arch: str, classes: list[int], seed: int, head: str = "embedding") -> SourceClassifier:
    torch.manual_seed(seed)
    return SourceClassifier(arch=arch, width=0.25, classes=classes, head=head)


@pytest.mark.parametrize("scoring", ["logits", "per_head_softmax"])
def test_module_scores_treated_references_like_a_by_hand_reset_of_copies(scoring: str) -> None:
    dm = TaskSplitDataModule(calibration_size=256, eval_batch_size=100)
    sources = [_untrained("vgg11_bn", [0, 1, 2, 3, 4], 0), _untrained("vgg11_bn", [5, 6, 7, 8, 9], 1)]
    module = MergeModule(sources, AverageMerge(), treated_references="all", scoring=scoring, heatmaps=0)
    r = _validate(module, dm).results
    tag = "phs_" if scoring == "per_head_softmax" else ""
    names = {"merged", "source0", "source1", "ensemble", "source0_reset", "source1_reset", "ensemble_reset"}
    assert {k.split("/")[0] for k in r} == names and all(k.split("/")[1].startswith(tag) for k in r)
    copies = [copy.deepcopy(m) for m in module.sources]
    for c in copies:
        reset_batchnorm(c, module.data.calibration_dataloader())
    loaders, heads = _first_batches(dm), module.prepared.heads
    ensemble = evaluate_model(SideBySide(copies), loaders, dm.tasks, heads, scoring=scoring)
    assert ensemble == {k: r[f"ensemble_reset/{tag}{k}"] for k in ensemble}
    for i, c in enumerate(copies):
        alone = evaluate_model(c, loaders, dm.tasks, heads, as_source=i, scoring=scoring)
        assert alone == {k: r[f"source{i}_reset/{tag}{k}"] for k in alone}
    untreated = evaluate_model(SideBySide(list(module.sources)), loaders, dm.tasks, heads, scoring=scoring)
    assert untreated == {k: r[f"ensemble/{tag}{k}"] for k in untreated}
    for src, ref in zip(module.sources, sources, strict=True):  # the sources were never reset
        assert all(
            torch.equal(a, b)
            for a, b in zip(src.state_dict().values(), ref.model.state_dict().values(), strict=True)
        )


def test_module_without_treatment_scores_no_reset_references() -> None:
    dm = TaskSplitDataModule(calibration_size=128, eval_batch_size=100)
    sources = [_untrained("mlp", [0, 1, 2, 3, 4], 0), _untrained("mlp", [5, 6, 7, 8, 9], 1)]
    r = _validate(MergeModule(sources, AverageMerge(), repair=False, heatmaps=0), dm).results
    assert {k.split("/")[0] for k in r} == {"merged", "source0", "source1", "ensemble"}


@pytest.mark.parametrize(
    ("head", "scoring"), itertools.product(["linear", "embedding"], ["logits", "per_head_softmax"])
)
def test_identical_sources_give_ensemble_equal_to_the_source(head: str, scoring: str) -> None:
    """Two copies of one source on the same classes: the ensemble (and their average) is that source.
    With an embedding head the source alone scores all classes, so only the per-task accuracy compares."""
    dm = TaskSplitDataModule(calibration_size=128, eval_batch_size=200)
    one = _untrained("mlp", [0, 1, 2, 3, 4], 3, head=head)
    module = MergeModule([one, copy.deepcopy(one)], AverageMerge(), scoring=scoring, heatmaps=0)
    r = _validate(module, dm).results
    tag = "phs_" if scoring == "per_head_softmax" else ""
    metrics = ["task0_acc", "joint_acc"] if head == "linear" else ["task0_acc"]
    for m in metrics:
        assert r[f"ensemble/{tag}{m}"] == r[f"source0/{tag}{m}"] == r[f"source1/{tag}{m}"]
        assert r[f"ensemble/{tag}{m}"] == r[f"merged/{tag}{m}"]
    assert 0.0 < r[f"source0/{tag}task0_acc"] < 1.0


# --------------------------------------------------------------------------- cost
def test_flops_and_params_exclude_zeroed_rows() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 5))
    dense = cost(model, (3, 4, 4))
    assert dense == Cost(8 * 27 + 8 + 128 * 5 + 5, 2 * 16 * 8 * 27 + 2 * 128 * 5)
    with torch.no_grad():
        model[0].weight[:3] = 0  # 3 of 8 output channels: a structural zero block
        model[3].weight[:2] = 0  # 2 of 5 output rows
    sparse = cost(model, (3, 4, 4))
    assert sparse.flops == 2 * 16 * 5 * 27 + 2 * 128 * 3
    assert sparse.params == 5 * 27 + 8 + 128 * 3 + 5
    assert sparse.relative_to(dense) == (sparse.params / dense.params, sparse.flops / dense.flops)
    assert count_flops(SideBySide([model, model]), (3, 4, 4)) == 2 * sparse.flops
    assert count_params(model) == sparse.params
    with torch.inference_mode():  # where Lightning's validation reports costs: linear / conv2d stay whole
        assert cost(model, (3, 4, 4)) == sparse
        assert count_flops(nn.Sequential(nn.Flatten(), model[3]), (8, 4, 4)) == 2 * 128 * 3


def test_flops_keep_zero_activations_and_count_attention_layers() -> None:
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    full = count_flops(layer, (5, 16))
    assert full >= 2 * 5 * (16 * 48 + 16 * 16 + 2 * 16 * 32)  # projections + MLP (no fused fast path)
    with torch.no_grad():
        layer.self_attn.in_proj_weight[:8] = 0
    assert count_flops(layer, (5, 16)) == full - 2 * 5 * 8 * 16
    relu_first = nn.Sequential(nn.ReLU(), nn.Linear(4, 2))  # its input is all zeros: still counted
    assert count_flops(relu_first, (4,)) == 2 * 4 * 2


def test_cost_errors_name_the_culprit() -> None:
    with pytest.raises(ValueError, match="input_shape must list positive sizes"):
        count_flops(nn.Linear(2, 2), (0, 2))
    with pytest.raises(TypeError, match="needs an nn.Module"):
        count_params("model")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot compare"):
        Cost(1, 1).relative_to(Cost(0, 0))
