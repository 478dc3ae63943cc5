"""Architectures, heads, the source classifier and programmatic training."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_merge.data import TaskSplitDataModule
from lightning_merge.models import (
    ARCHITECTURES,
    ClassEmbedding,
    EmbeddingHead,
    LinearHead,
    ResNet20,
    SourceClassifier,
    build_model,
    joint_predict,
    load_source,
    scatter_to_global,
    task_accuracy,
    train_source,
)
from lightning_merge.models.training import cache_path, source_key


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize(("head", "outputs"), [("embedding", 10), ("linear", 5)])
def test_forward_shapes(arch: str, in_channels: int, head: str, outputs: int) -> None:
    model = build_model(
        arch, in_channels=in_channels, head=head, num_classes=outputs, width=0.5, image_size=28
    )
    x = torch.randn(3, in_channels, 28, 28)
    assert model(x).shape == (3, outputs)
    assert isinstance(model.head, EmbeddingHead if head == "embedding" else LinearHead)
    # every architecture is traceable by torch.fx (the merge graph is built from the trace)
    traced = torch.fx.symbolic_trace(model.eval())
    assert torch.allclose(traced(x), model(x))


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_resnet20_widths(width: int) -> None:
    model = ResNet20(in_channels=3, width=width, head="linear", num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 18 + 2  # stem, 9 blocks × 2, two 1×1 shortcuts
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels] == [
        16 * width,
        32 * width,
    ]
    assert model.feature_dim == 64 * width and model.head.fc.in_features == 64 * width
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert model.layer2[0].shortcut[0].stride == (2, 2) and model.layer3[0].shortcut[0].kernel_size == (1, 1)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 10)


def test_resnet20_parameter_count() -> None:
    """ResNet-20×1, 3 input channels, 10-way linear head, 1×1-conv shortcuts: 272,474 parameters."""
    model = ResNet20(in_channels=3, width=1, head="linear", num_classes=10)
    convs = 3 * 16 * 9 + 6 * 16 * 16 * 9 + (16 * 32 * 9 + 5 * 32 * 32 * 9) + (32 * 64 * 9 + 5 * 64 * 64 * 9)
    shortcuts = 16 * 32 + 32 * 64
    bns = 2 * (16 * 7 + 32 * 6 + 64 * 6) + 2 * (32 + 64)  # stem + 18 block BNs + 2 shortcut BNs
    total = convs + shortcuts + bns + 64 * 10 + 10
    assert total == 272_474 and sum(p.numel() for p in model.parameters()) == total


def test_vgg_and_mlp_other_sizes() -> None:
    vgg = build_model("vgg11_bn", in_channels=3, width=0.25)
    assert vgg(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    mlp = build_model("mlp", in_channels=3, image_size=32, hidden=(64, 32))
    assert mlp.layers[0].in_features == 3 * 32 * 32 and mlp.feature_dim == 32
    assert mlp(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_build_model_errors() -> None:
    with pytest.raises(KeyError, match="unknown architecture 'resnet56'"):
        build_model("resnet56")
    with pytest.raises(TypeError, match="does not take \\['depth'\\]"):
        build_model("vgg11_bn", depth=3)
    with pytest.raises(ValueError, match="unknown head 'cosine'"):
        build_model("mlp", head="cosine")
    with pytest.raises(ValueError, match="width must be positive"):
        build_model("vgg11_bn", width=0)


def test_class_embedding_is_fixed_orthonormal_and_frozen() -> None:
    torch.manual_seed(1)
    a = ClassEmbedding(10, 32)
    torch.manual_seed(2)
    b = EmbeddingHead(64, num_classes=10, embed_dim=32).classes
    assert torch.equal(a.weight, b.weight)
    assert torch.allclose(a.weight @ a.weight.T, torch.eye(10), atol=1e-6)
    assert list(a.parameters()) == [] and "weight" in a.state_dict()
    with pytest.raises(ValueError, match="embed_dim=8"):
        ClassEmbedding(10, 8)


def test_embedding_joint_prediction_is_nearest_class_embedding() -> None:
    head = ClassEmbedding(10, 32)
    z = torch.randn(500, 32, generator=torch.Generator().manual_seed(0))
    logits = head(z)
    assert torch.allclose(logits, z @ head.weight.T)
    nearest = torch.cdist(z, head.weight).argmin(-1)
    assert torch.equal(logits.argmax(-1), nearest)
    # a feature pointing at class c's embedding is predicted as c
    assert torch.equal(head(3.0 * head.weight).argmax(-1), torch.arange(10))
    # two embedding-head models predict jointly over all classes
    assert torch.equal(joint_predict([logits, logits - 100.0]), nearest)
    other = torch.randn(500, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(joint_predict([logits, other]), torch.maximum(logits, other).argmax(-1))


def test_linear_head_joint_scatter() -> None:
    gen = torch.Generator().manual_seed(0)
    tasks = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    own = [torch.randn(64, 5, generator=gen), torch.randn(64, 5, generator=gen)]
    scattered = [scatter_to_global(o, t, 10) for o, t in zip(own, tasks, strict=True)]
    assert torch.equal(scattered[0][:, :5], own[0]) and torch.isinf(scattered[0][:, 5:]).all()
    concatenated = torch.cat(own, dim=1).argmax(-1)  # argmax over the concatenated heads
    expected = torch.tensor(tasks[0] + tasks[1])[concatenated]
    assert torch.equal(joint_predict(scattered), expected)
    # classes in any order land at their global positions
    out = scatter_to_global(torch.tensor([[1.0, 2.0, 3.0]]), [7, 0, 4], 10)
    assert out[0, 7] == 1.0 and out[0, 0] == 2.0 and out[0, 4] == 3.0
    with pytest.raises(ValueError, match="3 columns but classes lists 2"):
        scatter_to_global(torch.zeros(1, 3), [0, 1], 10)
    with pytest.raises(ValueError, match="at least one"):
        joint_predict([])


def test_classifier_label_spaces() -> None:
    emb = SourceClassifier(arch="mlp", head="embedding", classes=[7, 2, 5])
    lin = SourceClassifier(arch="mlp", head="linear", classes=[7, 2, 5])
    x = torch.randn(4, 1, 28, 28)
    logits = emb(x)
    assert logits.shape == (4, 10) and torch.equal(emb.own_logits(logits), logits[:, [7, 2, 5]])
    assert torch.equal(emb.joint_logits(logits), logits)
    assert lin(x).shape == (4, 3) and lin.joint_logits(lin(x)).shape == (4, 10)
    assert emb.targets(torch.tensor([5, 7, 2])).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match=r"labels \[0, 9\] are not among this model's classes \[7, 2, 5\]"):
        emb.targets(torch.tensor([9, 7, 0]))
    joint = SourceClassifier.joint_predict(
        [lin, SourceClassifier(arch="mlp", head="linear", classes=[0, 1])], x
    )
    assert joint.shape == (4,) and set(joint.tolist()) <= {0, 1, 2, 5, 7}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"classes": [1, 1]}, "distinct"),
        ({"classes": [10]}, r"\[0, 10\)"),
        ({"head": "cosine"}, "head must be"),
        ({"lr": -1.0}, "lr must be"),
        ({"warmup_fraction": 1.5}, "warmup_fraction"),
        ({"momentum": 0.0}, "nesterov=True needs momentum"),
    ],
)
def test_classifier_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SourceClassifier(arch="mlp", **kwargs)


def test_train_source_caches_and_reloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kw = {"max_epochs": 1, "limit_train_batches": 3, "cache_dir": tmp_path, "head": "linear", "lr": 0.05}
    model = train_source("mlp", [3, 8], seed=5, **kw)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("mlp_w1_c3-8_s5_") and files[0].endswith(".ckpt")

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached model must not be retrained")

    monkeypatch.setattr(pl.Trainer, "fit", no_training)
    again = train_source("mlp", [3, 8], seed=5, **kw)
    assert again.classes == [3, 8] and again.hparams.head == "linear"
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    monkeypatch.undo()
    # a different initialisation is a different cache entry
    train_source("mlp", [3, 8], seed=5, init_state_dict=model.model.state_dict(), **kw)
    assert len(list(tmp_path.glob("*.ckpt"))) == 2


def test_train_source_init_state_dict_is_used() -> None:
    base = SourceClassifier(arch="mlp", classes=[0, 1])
    tuned = train_source(
        "mlp", [0, 1], seed=0, max_epochs=1, limit_train_batches=1, lr=0.0, init_state_dict=base.state_dict()
    )
    for (name, a), b in zip(base.model.state_dict().items(), tuned.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # lr=0: weights stay at the given initialisation


def test_load_source_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_source(tmp_path / "nope.ckpt")


def test_quick_mlp_pair_learns_its_tasks(
    mlp_pair: list[SourceClassifier], fmnist: TaskSplitDataModule
) -> None:
    for task, model in enumerate(mlp_pair):
        assert model.classes == fmnist.tasks[task] and not model.training
        accuracy = task_accuracy(model, fmnist.task_test_dataloader(task))
        print(f"\nMLP×1 source {task}: own-task accuracy {accuracy:.4f}")
        assert accuracy > 0.85
    # the two sources were trained from different seeds
    assert not torch.equal(mlp_pair[0].model.layers[0].weight, mlp_pair[1].model.layers[0].weight)


def test_train_source_precision_is_in_the_cache_key_only_when_set(tmp_path: Path) -> None:
    plain = source_key("mlp", [3, 8], 5)
    assert "precision" not in plain  # keys (and file names) of float32 checkpoints stay as they were
    bf16 = source_key("mlp", [3, 8], 5, precision="bf16-mixed")
    assert bf16 == {**plain, "precision": "bf16-mixed"}
    assert cache_path(tmp_path, plain) != cache_path(tmp_path, bf16)

    kw = {"max_epochs": 1, "limit_train_batches": 2, "cache_dir": tmp_path, "lr": 0.05}
    full = train_source("mlp", [3, 8], seed=5, **kw)
    mixed = train_source("mlp", [3, 8], seed=5, precision="bf16-mixed", **kw)
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*.json"))]
    assert sorted(r.get("precision", "32-true") for r in records) == ["32-true", "bf16-mixed"]
    weights = [m.model.state_dict() for m in (full, mixed)]
    assert all(v.dtype == torch.float32 for w in weights for v in w.values() if v.is_floating_point())
    assert any(not torch.equal(a, b) for a, b in zip(weights[0].values(), weights[1].values(), strict=True))


def test_train_source_rejects_unknown_precision() -> None:
    with pytest.raises(ValueError, match="fp7"):
        train_source("mlp", [0, 1], seed=0, limit_train_batches=1, precision="fp7")


def test_test_seed_offset_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """LIGHTNING_MERGE_TEST_SEED (tests/trained.py) shifts the test models' seeds; junk is an error."""
    from trained import SEED_ENV, seed_offset

    monkeypatch.delenv(SEED_ENV, raising=False)
    assert seed_offset() == 0
    monkeypatch.setenv(SEED_ENV, " 100 ")
    assert seed_offset() == 100
    for bad in ("abc", "1.5", "-3"):
        monkeypatch.setenv(SEED_ENV, bad)
        with pytest.raises(ValueError, match=f"{SEED_ENV} must be a non-negative integer"):
            seed_offset()
