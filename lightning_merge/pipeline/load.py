"""Stage 1 of a merge: loading and checking the source models, safely, from any checkpoint.

A source is one of

* a checkpoint path (``str`` / ``PathLike``): a Lightning checkpoint of the project's
  ``SourceClassifier`` or of any LightningModule whose class Lightning recorded (LightningCLI in
  subclass mode stores ``_class_path`` in its hyperparameters);
* a :class:`SourceSpec` (YAML: ``{path: a.ckpt, attribute: net}``): a checkpoint of any LightningModule
  (class from the checkpoint or ``constructor``), or a state-dict / safetensors file plus a
  ``constructor`` (class or function path, e.g. ``torchvision.models.resnet18``) and its ``arguments``;
  ``attribute`` names the network to merge inside the loaded module; ``head`` / ``classes`` declare
  its label space when the checkpoint does not;
* an ``nn.Module`` (from Python).

**Safe by default.** Pickled checkpoints are read with ``torch.load(weights_only=True)``: tensors,
containers, numbers, strings and the few classes in :data:`SAFE_GLOBALS`. A file that needs any other
class (a pickle that could run code) is refused, naming the file and the opt-in; it is unpickled in
full only for ``SourceSpec(trusted=True)`` or ``MergeModule(trusted_checkpoints=True)``. Importing the
LightningModule class a checkpoint names runs that module's import-time code, as ``LightningCLI``
does; the class must be a ``LightningModule``.

Errors name the culprit: which source (``sources[1]``), which file, attribute, key or parameter.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PosixPath, PurePosixPath, PureWindowsPath, WindowsPath
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_merge.models.classifier import SourceClassifier

#: ``SourceClassifier`` hyperparameters that define the network (the rest is training recipe / task).
ARCH_HPARAMS = ("arch", "width", "in_channels", "image_size", "head", "num_classes", "embed_dim")

#: Classes a safe load may build besides torch's defaults. Lightning (>= 1.x) writes hyperparameters
#: as a plain ``dict`` and its loop/callback/optimiser states as containers of tensors and numbers;
#: the one common non-builtin value is a ``pathlib`` path among the hyperparameters. (``AttributeDict``
#: cannot be allow-listed: torch's safe unpickler refuses item assignment on dict subclasses; Lightning
#: does not write it.) Other classes need ``trusted=True`` or ``torch.serialization.add_safe_globals``.
SAFE_GLOBALS: list[Any] = [PosixPath, WindowsPath, PurePosixPath, PureWindowsPath]

#: Lightning's instantiator of LightningCLI-built modules (nested ``class_path`` configs).
_CLI_INSTANTIATORS = ("lightning.pytorch.cli.instantiate_module", "pytorch_lightning.cli.instantiate_module")
_TRUST_HINT = (
    "if you trust the file, opt in to full unpickling (which runs whatever code it holds): "
    "SourceSpec(path=..., trusted=True) (YAML: `- {{path: {path}, trusted: true}}`) or "
    "MergeModule(..., trusted_checkpoints=True)"
)


@dataclass
class SourceSpec:
    """One source model, as YAML gives it.

    Args:
        path: a Lightning checkpoint, a ``torch.save``-d state dict or a ``.safetensors`` file.
        attribute: dotted attribute path of the network to merge inside the loaded module (``"net"``,
            ``"model.backbone"``); default: the module itself (a ``SourceClassifier``: its ``model``).
        constructor: class or function path. For a Lightning checkpoint, the LightningModule class
            (default: the ``_class_path`` Lightning stored); for a state-dict file, what builds the
            module the weights load into (``torchvision.models.resnet18``).
        arguments: keyword arguments of ``constructor`` (Lightning checkpoints: override stored
            hyperparameters).
        prefix: state-dict key prefix to strip before loading into ``constructor``'s module (e.g.
            ``"net."`` to load a LightningModule's submodule weights into a plain network).
        head: ``"linear"``: the outputs are this source's own ``classes``, in order (concatenated
            heads); ``"embedding"``: the outputs score all classes (a shared head / one label space).
            Default: read from the output width.
        classes: the global class ids this source was trained on (default: task i's classes).
        trusted: unpickle the file in full (only for files you trust: a pickle can run code).
    """

    path: str | None = None
    attribute: str | None = None
    constructor: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    prefix: str = ""
    head: Literal["linear", "embedding"] | None = None
    classes: list[int] | None = None
    trusted: bool = False


Source = SourceSpec | str | os.PathLike | nn.Module


@dataclass
class LoadedSource:
    """A source after loading: the module read, the network merged, what it says about itself."""

    name: str
    module: nn.Module
    network: nn.Module
    architecture: dict[str, Any] | None = None
    head: Literal["linear", "embedding"] | None = None
    classes: tuple[int, ...] | None = None

    @property
    def classifier(self) -> SourceClassifier | None:
        """The project's classifier whose ``model`` is merged (it records its own head), else ``None``."""
        m = self.module
        return m if isinstance(m, SourceClassifier) and self.network is m.model else None


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint the safe loader refused (it needs classes outside the allow-list)."""


def describe(source: Source) -> str:
    """A source as recipes and errors name it: its path, or ``<ClassName>`` for a module."""
    if isinstance(source, SourceSpec):
        return source.path if source.path is not None else f"<{source.constructor}>"
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"<{type(source).__name__}>"


def source_path(source: Source) -> str | None:
    """The file a source is read from (``None`` for a module)."""
    if isinstance(source, SourceSpec):
        return source.path
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else None


def check_source_paths(specs: Sequence[Source], *, has_base: bool = False) -> None:
    """Every source names an existing file or is a module (the last one is the base when ``has_base``)."""
    for i, spec in enumerate(specs):
        label = "base" if has_base and i == len(specs) - 1 else f"sources[{i}]"
        if not isinstance(spec, (SourceSpec, str, os.PathLike, nn.Module)):
            raise TypeError(
                f"{label} must be a checkpoint path, a SourceSpec or an nn.Module, got {type(spec).__name__}"
            )
        path = source_path(spec)
        if isinstance(spec, SourceSpec) and path is None:
            raise ValueError(f"{label}: a SourceSpec needs path= (the checkpoint or weights file)")
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{label}: checkpoint {path} does not exist")


# --------------------------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike, label: str, *, trusted: bool = False) -> Any:
    """The object stored at ``path``: safetensors, or a pickle read safely unless ``trusted``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{label}: checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise ValueError(f"{label}: cannot read {path} as a safetensors file ({err})") from err
    try:
        if trusted:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trusted and "Weights only load failed" in str(err):
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
            what = f"it would build {found.group(1)}" if found else "it holds objects outside the allow-list"
            raise UnsafeCheckpointError(
                f"{label}: {path} was refused by the safe loader ({what}); " + _TRUST_HINT.format(path=path)
            ) from None
        raise ValueError(f"{label}: cannot read {path} as a PyTorch checkpoint ({err})") from err
    except Exception as err:  # zip / EOF / format errors of all kinds
        raise ValueError(f"{label}: cannot read {path} as a PyTorch checkpoint ({err})") from err


def import_object(dotted: str, label: str, what: str = "constructor") -> Any:
    """The object at ``package.module.Name`` (nested names allowed), imported; errors name ``label``."""
    if not isinstance(dotted, str) or "." not in dotted.strip("."):
        raise ValueError(f"{label}: {what} {dotted!r} is not a dotted path like 'package.module.Name'")
    parts = dotted.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue  # a shorter prefix may be the module (the rest: attributes)
            raise ImportError(f"{label}: cannot import {what} {dotted!r}: {err}") from err
        except Exception as err:
            raise ImportError(
                f"{label}: importing {module_name!r} for {what} {dotted!r} failed: {err}"
            ) from err
        for name in parts[cut:]:
            if not hasattr(obj, name):
                raise ImportError(
                    f"{label}: cannot import {what} {dotted!r}: {module_name!r} has no {name!r}"
                )
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"{label}: cannot import {what} {dotted!r}: no module {parts[0]!r}")


# --------------------------------------------------------------------------------------- building
def is_lightning_checkpoint(obj: Any) -> bool:
    """A dict Lightning wrote: a ``state_dict`` plus its version or hyperparameters."""
    return (
        isinstance(obj, Mapping)
        and isinstance(obj.get("state_dict"), Mapping)
        and ("pytorch-lightning_version" in obj or "hyper_parameters" in obj)
    )


def lightning_class(ckpt: Mapping[str, Any], spec: SourceSpec, label: str, path: str) -> type:
    """The LightningModule class of a checkpoint: ``spec.constructor``, the stored ``_class_path``, or
    ``SourceClassifier`` for the project's own checkpoints."""
    hparams = ckpt.get("hyper_parameters") or {}
    dotted = spec.constructor or hparams.get("_class_path")
    if dotted is None:
        if "arch" in hparams:
            return SourceClassifier
        raise ValueError(
            f"{label}: {path} does not say which LightningModule class wrote it (no "
            "hyper_parameters._class_path: it was not saved by a LightningCLI in subclass mode, and it is "
            "not a SourceClassifier checkpoint); name it: {path: ..., constructor: my_package.MyModule}"
        )
    cls = import_object(dotted, label, "the checkpoint's LightningModule class")
    if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
        raise TypeError(f"{label}: {dotted!r} (class of {path}) is not a LightningModule class")
    return cls


def build_lightning_module(
    cls: type, ckpt: Mapping[str, Any], spec: SourceSpec, label: str, path: str
) -> pl.LightningModule:
    """``cls`` rebuilt from the checkpoint's hyperparameters (LightningCLI's nested configs included),
    hooks run as Lightning's own loader does, weights loaded strictly."""
    hparams = dict(ckpt.get("hyper_parameters") or {}) | dict(spec.arguments)
    instantiator = hparams.pop("_instantiator", None)
    hparams.pop("_class_path", None)
    try:
        if instantiator in _CLI_INSTANTIATORS:
            from lightning.pytorch.cli import instantiate_module

            module = instantiate_module(cls, hparams)
        else:
            module = cls(**_init_kwargs(cls, hparams, ckpt.get("hparams_name")))
    except Exception as err:
        raise ValueError(
            f"{label}: cannot build {cls.__module__}.{cls.__qualname__} from the hyperparameters of "
            f"{path} ({type(err).__name__}: {err})"
        ) from err
    if type(module).configure_model is not pl.LightningModule.configure_model:
        module.configure_model()
    module.on_load_checkpoint(dict(ckpt))
    load_weights(module, ckpt["state_dict"], label, path)
    return module


def _init_kwargs(cls: type, hparams: dict[str, Any], hparams_name: str | None) -> dict[str, Any]:
    """Lightning's rule: hyperparameters saved from one argument (``hparams``) go back as that argument;
    others only as named ``__init__`` parameters unless it takes ``**kwargs``."""
    params = inspect.signature(cls.__init__).parameters
    if hparams_name and hparams_name in params:
        return {hparams_name: hparams}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return hparams
    return {k: v for k, v in hparams.items() if k in params}


def build_from_constructor(spec: SourceSpec, state: Mapping[str, Any], label: str, path: str) -> nn.Module:
    """``constructor(**arguments)`` with the weights of ``state`` (minus ``spec.prefix``) loaded strictly."""
    if spec.constructor is None:
        raise ValueError(
            f"{label}: {path} holds bare weights (no Lightning checkpoint): give the model that takes them, "
            "e.g. {path: ..., constructor: torchvision.models.resnet18, arguments: {num_classes: 10}}"
        )
    make = import_object(spec.constructor, label)
    if not callable(make):
        raise TypeError(f"{label}: constructor {spec.constructor!r} is not callable")
    try:
        module = make(**spec.arguments)
    except Exception as err:
        raise ValueError(
            f"{label}: {spec.constructor}(**{spec.arguments!r}) failed ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(module, nn.Module):
        raise TypeError(f"{label}: {spec.constructor!r} returned {type(module).__name__}, not an nn.Module")
    if spec.prefix:
        state = {k[len(spec.prefix) :]: v for k, v in state.items() if k.startswith(spec.prefix)}
        if not state:
            raise ValueError(
                f"{label}: no key of the state dict in {path} starts with prefix {spec.prefix!r}"
            )
    load_weights(module, state, label, path)
    return module


def load_weights(module: nn.Module, state: Mapping[str, Any], label: str, path: str) -> None:
    """``module.load_state_dict(state)``, strict; a misfit names the keys (or shapes) that differ."""
    bad = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ValueError(f"{label}: the state dict in {path} holds non-tensor entries {bad[:5]}")
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{label}: the state dict in {path} does not fit {type(module).__name__}: "
            f"missing keys {missing[:5]} ({len(missing)} in all), unexpected keys {unexpected[:5]} "
            f"({len(unexpected)} in all); check the constructor, its arguments and prefix="
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{label}: {key!r} has shape {tuple(state[key].shape)} in {path} but "
                f"{tuple(tensor.shape)} in {type(module).__name__}; check the constructor's arguments"
            )
    module.load_state_dict(dict(state), strict=True)


def network_at(module: nn.Module, attribute: str | None, label: str) -> nn.Module:
    """The submodule at dotted ``attribute`` (``None``: the module, or a ``SourceClassifier``'s model)."""
    if attribute is None:
        return module.model if isinstance(module, SourceClassifier) else module
    obj: Any = module
    for depth, name in enumerate(attribute.split(".")):
        if not hasattr(obj, name):
            where = ".".join(attribute.split(".")[:depth]) or type(module).__name__
            children = [n for n, _ in obj.named_children()] if isinstance(obj, nn.Module) else []
            raise AttributeError(
                f"{label}: no network at attribute path {attribute!r}: {where} has no attribute {name!r} "
                f"(its submodules: {children})"
            )
        obj = getattr(obj, name)
    if not isinstance(obj, nn.Module):
        raise TypeError(f"{label}: attribute {attribute!r} is a {type(obj).__name__}, not an nn.Module")
    return obj


# --------------------------------------------------------------------------------------- loading
def load_source(source: Source, label: str, *, trusted: bool = False) -> LoadedSource:
    """Load one source (CPU, eval mode); ``trusted`` unpickles checkpoint files in full."""
    name = describe(source)
    if isinstance(source, nn.Module):
        return LoadedSource(name, source, network(source), architecture_of(source))
    if isinstance(source, (str, os.PathLike)):
        source = SourceSpec(path=os.fspath(source))
    if not isinstance(source, SourceSpec):
        raise TypeError(
            f"{label} must be a checkpoint path, a SourceSpec or an nn.Module, got {type(source).__name__}"
        )
    if source.path is None:
        raise ValueError(f"{label}: a SourceSpec needs path= (the checkpoint or weights file)")
    path = source.path
    stored = read_checkpoint(path, label, trusted=trusted or source.trusted)
    module = _module_of(stored, source, label, path).eval()
    net = network_at(module, source.attribute, label)
    classes = None if source.classes is None else tuple(int(c) for c in source.classes)
    arch = architecture_of(module) if net is getattr(module, "model", None) else None
    return LoadedSource(name, module, net, arch, source.head, classes)


def _module_of(stored: Any, spec: SourceSpec, label: str, path: str) -> nn.Module:
    """The module a file's content describes (see :func:`load_source`)."""
    if is_lightning_checkpoint(stored):
        make = import_object(spec.constructor, label) if spec.constructor else None
        if make is not None and not (isinstance(make, type) and issubclass(make, pl.LightningModule)):
            return build_from_constructor(spec, stored["state_dict"], label, path)
        cls = lightning_class(stored, spec, label, path)
        return build_lightning_module(cls, stored, spec, label, path)
    if isinstance(stored, Mapping) and stored and all(isinstance(v, torch.Tensor) for v in stored.values()):
        return build_from_constructor(spec, stored, label, path)
    keys = sorted(map(str, stored))[:8] if isinstance(stored, Mapping) else type(stored).__name__
    raise ValueError(
        f"{label}: {path} is neither a Lightning checkpoint (state_dict + hyper_parameters) nor a state "
        f"dict of tensors (found {keys})"
    )


def architecture_of(model: nn.Module) -> dict[str, Any] | None:
    """The network-defining hyperparameters of a ``SourceClassifier``; ``None`` for a plain module."""
    if not isinstance(model, SourceClassifier):
        return None
    return {k: model.hparams[k] for k in ARCH_HPARAMS if k in model.hparams}


def network(model: nn.Module) -> nn.Module:
    """The merged network of a module as given: a ``SourceClassifier``'s ``model``, else itself."""
    return model.model if isinstance(model, SourceClassifier) else model


def check_same_architecture(sources: Sequence[LoadedSource]) -> None:
    """Raise ``ValueError`` naming the first hyperparameter or parameter where a source differs."""
    ref = sources[0]
    ref_state = ref.network.state_dict()
    for other in sources[1:]:
        if ref.architecture is not None and other.architecture is not None:
            for key in ARCH_HPARAMS:
                if ref.architecture.get(key) != other.architecture.get(key):
                    raise ValueError(
                        f"{other.name} has {key}={other.architecture.get(key)!r} but "
                        f"{ref.name} has {key}={ref.architecture.get(key)!r}: "
                        "merged models must share one architecture"
                    )
        state = other.network.state_dict()
        for key, tensor in ref_state.items():
            if key not in state:
                raise ValueError(
                    f"{other.name} has no parameter {key!r} ({ref.name} has): different architectures"
                )
            if state[key].shape != tensor.shape:
                raise ValueError(
                    f"parameter {key!r} has shape {tuple(state[key].shape)} in {other.name} but "
                    f"{tuple(tensor.shape)} in {ref.name}: different architectures"
                )
        extra = sorted(set(state) - set(ref_state))
        if extra:
            raise ValueError(
                f"{other.name} has parameter {extra[0]!r} that {ref.name} lacks: different architectures"
            )
