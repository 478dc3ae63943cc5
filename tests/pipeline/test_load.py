"""Loading sources: safe by default, any Lightning checkpoint, state-dict / safetensors files, and
errors that name the culprit (file, attribute, class path, key, declared head)."""

from __future__ import annotations

import pathlib
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lightning_merge.evaluation import head_of
from lightning_merge.pipeline.load import (
    SourceSpec,
    UnsafeCheckpointError,
    check_same_architecture,
    load_source,
)


class Tiny(pl.LightningModule):
    """A user's LightningModule: the network to merge is ``self.net``; ``where`` is a Path hparam."""

    def __init__(self, hidden: int = 8, outputs: int = 3, where: pathlib.Path | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, outputs))
        self.loss_scale = 1.0  # not a module: an attribute path to it is refused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


TINY = f"{__name__}.Tiny"


class Payload:
    """Unpickling this writes ``marker``: what a malicious checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('ran')",))


def lightning_checkpoint(path: Path, module: pl.LightningModule, **extra: object) -> Path:
    """What ``trainer.save_checkpoint`` writes, reduced to the keys a loader reads."""
    hparams = dict(module.hparams) | extra.pop("hparams", {})
    payload = {"state_dict": module.state_dict(), "hyper_parameters": hparams}
    torch.save(payload | {"pytorch-lightning_version": pl.__version__} | extra, path)
    return path


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    path = lightning_checkpoint(tmp_path / "evil.ckpt", Tiny(), hparams={"note": Payload(marker)})
    with pytest.raises(UnsafeCheckpointError, match=r"sources\[0\]: .*evil.ckpt was refused") as err:
        load_source(SourceSpec(path=str(path), constructor=TINY), "sources[0]")
    assert "it would build exec" in str(err.value)
    assert "trusted: true" in str(err.value) and "trusted_checkpoints=True" in str(err.value)
    assert not marker.exists()
    # the payload is live: the explicit opt-in runs it (which is why it is opt-in)
    load_source(SourceSpec(path=str(path), constructor=TINY, trusted=True), "sources[0]")
    assert marker.read_text() == "ran"


def test_a_plain_path_is_read_safely_too(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="evil.pt was refused"):
        load_source(str(path), "base")
    assert not marker.exists()


def test_lightning_checkpoint_with_path_hparam_loads_safely_at_an_attribute(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = Tiny(hidden=6, where=pathlib.Path("data/x"))
    path = lightning_checkpoint(tmp_path / "tiny.ckpt", module, hparams={"_class_path": TINY})
    loaded = load_source(SourceSpec(path=str(path), attribute="net"), "sources[0]")
    assert isinstance(loaded.module, Tiny) and loaded.module.hparams.where == pathlib.Path("data/x")
    assert loaded.network is loaded.module.net and not loaded.network.training
    ref = module.net.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in loaded.network.state_dict().items())


def test_lightning_cli_hparams_rebuild_nested_class_configs(tmp_path: Path) -> None:
    """LightningCLI stores ``_class_path`` and ``_instantiator``; nested configs stay dicts."""
    module = Tiny(hidden=5)
    hparams = {"_class_path": TINY, "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    path = lightning_checkpoint(tmp_path / "cli.ckpt", module, hparams=hparams)
    loaded = load_source(str(path), "sources[1]")
    assert isinstance(loaded.module, Tiny) and loaded.module.hparams.hidden == 5
    assert loaded.network is loaded.module  # default attribute: the module itself


def test_network_not_found_at_the_attribute_path_is_named(tmp_path: Path) -> None:
    path = lightning_checkpoint(tmp_path / "tiny.ckpt", Tiny())
    with pytest.raises(
        AttributeError, match=r"sources\[1\]: no network at attribute path 'backbone.fc'.*\['net'\]"
    ):
        load_source(SourceSpec(path=str(path), attribute="backbone.fc", constructor=TINY), "sources[1]")
    with pytest.raises(TypeError, match=r"attribute 'loss_scale' is a float, not an nn.Module"):
        load_source(SourceSpec(path=str(path), attribute="loss_scale", constructor=TINY), "sources[1]")


def test_a_checkpoint_class_that_cannot_be_imported_is_named(tmp_path: Path) -> None:
    path = lightning_checkpoint(
        tmp_path / "gone.ckpt", Tiny(), hparams={"_class_path": "gone_pkg.models.Net"}
    )
    with pytest.raises(ImportError, match=r"sources\[0\]: cannot import .*class 'gone_pkg.models.Net'"):
        load_source(str(path), "sources[0]")
    with pytest.raises(ImportError, match=r"'test_load' has no 'Missing'|has no 'Missing'"):
        load_source(SourceSpec(path=str(path), constructor=f"{__name__}.Missing"), "sources[0]")
    with pytest.raises(TypeError, match=r"'torch.nn.Linear' .* is not a LightningModule class"):
        lightning_checkpoint(tmp_path / "lin.ckpt", Tiny(), hparams={"_class_path": "torch.nn.Linear"})
        load_source(str(tmp_path / "lin.ckpt"), "sources[0]")


def test_a_checkpoint_without_a_class_asks_for_the_constructor(tmp_path: Path) -> None:
    path = lightning_checkpoint(tmp_path / "plain.ckpt", Tiny())
    with pytest.raises(
        ValueError, match=r"plain.ckpt does not say which LightningModule class .*constructor:"
    ):
        load_source(str(path), "sources[0]")


def test_torchvision_model_from_state_dict_and_safetensors_files(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=7)
    torch.save(model.state_dict(), tmp_path / "r18.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    for name in ("r18.pt", "r18.safetensors"):
        spec = SourceSpec(
            path=str(tmp_path / name), constructor="torchvision.models.resnet18", arguments={"num_classes": 7}
        )
        loaded = load_source(spec, "sources[0]")
        ref = model.state_dict()
        assert all(torch.equal(ref[k], v) for k, v in loaded.network.state_dict().items()), name


def test_state_dict_keys_not_fitting_the_constructor_are_named(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    torch.save(model.state_dict(), tmp_path / "seq.pt")
    spec = SourceSpec(path=str(tmp_path / "seq.pt"), constructor="torchvision.models.resnet18")
    with pytest.raises(
        ValueError, match=r"sources\[1\]: the state dict in .*seq.pt does not fit ResNet: missing"
    ):
        load_source(spec, "sources[1]")
    spec = SourceSpec(
        path=str(tmp_path / "seq.pt"), constructor="torch.nn.Linear", arguments={"in_features": 4}
    )
    with pytest.raises(
        ValueError, match=r"torch.nn.Linear\(\*\*\{'in_features': 4\}\) failed .*out_features"
    ):
        load_source(spec, "sources[1]")
    bare = SourceSpec(path=str(tmp_path / "seq.pt"))
    with pytest.raises(ValueError, match=r"seq.pt holds bare weights .*constructor"):
        load_source(bare, "sources[1]")


def test_submodule_weights_of_a_lightning_checkpoint_load_into_a_plain_network(tmp_path: Path) -> None:
    module = Tiny(hidden=8)
    path = lightning_checkpoint(tmp_path / "tiny.ckpt", module)
    spec = SourceSpec(
        path=str(path), constructor=f"{__name__}.plain_net", arguments={"hidden": 8}, prefix="net."
    )
    loaded = load_source(spec, "sources[0]")
    x = torch.randn(5, 4)
    torch.testing.assert_close(loaded.network(x), module.net.eval()(x), rtol=0, atol=0)
    wrong = SourceSpec(
        path=str(path), constructor=f"{__name__}.plain_net", arguments={"hidden": 9}, prefix="net."
    )
    with pytest.raises(ValueError, match=r"'1.weight' has shape \(8, 4\) in .*tiny.ckpt but \(9, 4\)"):
        load_source(wrong, "sources[0]")


def plain_net(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def test_sources_whose_outputs_do_not_fit_the_declared_heads_are_named() -> None:
    net, example = plain_net(8), torch.randn(2, 4)  # 3 outputs
    tasks = [[0, 1, 2], [3, 4, 5]]
    assert head_of(1, net, tasks, 6, example).classes == (3, 4, 5)  # undeclared: task 1's classes
    head = head_of(0, net, tasks, 6, example, kind="linear", classes=[5, 0, 2], name="sources[0] (a.ckpt)")
    assert head.kind == "linear" and head.classes == (5, 0, 2)
    with pytest.raises(
        ValueError, match=r"sources\[0\] \(a.ckpt\) outputs 3 logits: a embedding head needs 6"
    ):
        head_of(0, net, tasks, 6, example, kind="embedding", name="sources[0] (a.ckpt)")
    with pytest.raises(ValueError, match=r"sources\[1\] \(b.ckpt\) outputs 3 logits: neither .*\[0, 1\]"):
        head_of(1, net, tasks, 6, example, classes=[0, 1], name="sources[1] (b.ckpt)")
    with pytest.raises(ValueError, match=r"classes must be distinct ids in \[0, 6\), got \[0, 9, 1\]"):
        head_of(1, net, tasks, 6, example, classes=[0, 9, 1])


def test_different_networks_at_the_attribute_are_named(tmp_path: Path) -> None:
    a = lightning_checkpoint(tmp_path / "a.ckpt", Tiny(hidden=8), hparams={"_class_path": TINY})
    b = lightning_checkpoint(tmp_path / "b.ckpt", Tiny(hidden=9), hparams={"_class_path": TINY})
    loaded = [
        load_source(SourceSpec(path=str(p), attribute="net"), f"sources[{i}]") for i, p in enumerate((a, b))
    ]
    with pytest.raises(ValueError, match=r"parameter '1.weight' has shape \(9, 4\) in .*b.ckpt but \(8, 4\)"):
        check_same_architecture(loaded)


def test_a_source_classifier_is_placed_at_declared_global_ids() -> None:
    """A model trained on another data set's 10 labels joins a 20-class merge at ids 10..19."""
    from lightning_merge.models.classifier import SourceClassifier

    model = SourceClassifier(arch="mlp", width=0.25, head="linear", num_classes=10).eval()
    example = torch.randn(2, 1, 28, 28)
    tasks = [list(range(10)), list(range(10, 20))]
    own = head_of(1, model, [list(range(10))], 10, example)
    assert (own.kind, own.classes, own.num_classes) == ("linear", tuple(range(10)), 10)
    placed = head_of(1, model, tasks, 20, example, classes=list(range(10, 20)))
    assert (placed.kind, placed.classes, placed.num_classes) == ("linear", tuple(range(10, 20)), 20)
    with pytest.raises(
        ValueError, match=r"source 1 was trained on a 10-class label space but the data have 20"
    ):
        head_of(1, model, tasks, 20, example)
    with pytest.raises(
        ValueError, match=r"declares head='embedding' but its checkpoint records head='linear'"
    ):
        head_of(1, model, tasks, 20, example, kind="embedding", classes=list(range(10, 20)))


def test_prepare_sources_refuses_unsafe_files_unless_trusted(tmp_path: Path) -> None:
    """The merge's first stage (what ``MergeModule(trusted_checkpoints=...)`` calls) is safe by default."""
    from lightning_merge.pipeline.prepare import prepare_sources

    marker = tmp_path / "pwned.txt"
    safe = lightning_checkpoint(tmp_path / "a.ckpt", Tiny(), hparams={"_class_path": TINY})
    evil = lightning_checkpoint(
        tmp_path / "b.ckpt", Tiny(), hparams={"_class_path": TINY, "x": Payload(marker)}
    )
    sources = [SourceSpec(path=str(p), attribute="net") for p in (safe, evil)]
    tasks, example = [[0, 1, 2], [3, 4, 5]], torch.randn(4, 4)
    with pytest.raises(UnsafeCheckpointError, match=r"sources\[1\]: .*b.ckpt was refused"):
        prepare_sources(sources, tasks, 6, example)
    assert not marker.exists()
    prepared = prepare_sources(sources, tasks, 6, example, trusted=True)
    assert marker.exists() and [h.classes for h in prepared.heads] == [(0, 1, 2), (3, 4, 5)]
