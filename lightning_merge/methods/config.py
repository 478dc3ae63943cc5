"""A method as data: ``{"class_path", "init_args"}`` read back from the object, and built again.

The recipe of an export, the hyperparameters a logger records and the benchmark tables all store
a method this way; nested methods (``AlignedMerge(aligner=..., merger=...)``) nest the same shape,
which is also what LightningCLI / jsonargparse reads from YAML.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from lightning_merge.methods.base import MergeMethod


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def init_arguments(method: MergeMethod, *, strict: bool = False) -> dict[str, Any]:
    """``{name: value}`` of the method's ``__init__`` arguments, read from its attributes.

    ``strict``: raise when an argument is not kept under its own name (it could not be recorded).
    """
    out = {}
    for name, param in inspect.signature(type(method).__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if name in vars(method):
            out[name] = vars(method)[name]
        elif strict:
            raise TypeError(
                f"{type(method).__name__} does not keep its __init__ argument {name!r} as an attribute "
                "of that name, so its configuration cannot be recorded"
            )
    return out


def method_config(method: MergeMethod) -> dict[str, Any]:
    """``{"name", "class_path", "init_args"}`` of a method; nested methods become
    ``{"class_path", "init_args"}`` mappings, other values YAML-safe copies (see :func:`_plain`)."""
    if not isinstance(method, MergeMethod):
        raise TypeError(f"method_config needs a MergeMethod, got {type(method).__name__}")
    return {"name": method.name, **_nested_config(method)}


def _nested_config(method: MergeMethod) -> dict[str, Any]:
    args = init_arguments(method, strict=True)
    return {"class_path": class_path(type(method)), "init_args": {k: _plain(v) for k, v in args.items()}}


def _plain(value: Any) -> Any:
    """A YAML-safe copy of an ``__init__`` argument (nested methods as configs, dicts and lists kept,
    other objects as their repr)."""
    if isinstance(value, MergeMethod):
        return _nested_config(value)
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def build_method(config: Mapping[str, Any]) -> MergeMethod:
    """The method a :func:`method_config` mapping describes (nested methods built too)."""
    if not isinstance(config, Mapping) or "class_path" not in config:
        raise ValueError(f"a method config is a mapping with 'class_path' and 'init_args', got {config!r}")
    cls = _import_class(str(config["class_path"]))
    args = config.get("init_args") or {}
    if not isinstance(args, Mapping):
        raise TypeError(f"init_args of {config['class_path']} must be a mapping, got {type(args).__name__}")
    return cls(**{k: _build_value(v) for k, v in args.items()})


def _build_value(value: Any) -> Any:
    if isinstance(value, Mapping) and "class_path" in value:
        return build_method(value)
    return value


def _import_class(path: str) -> type[MergeMethod]:
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError) as err:
        raise ValueError(f"method class_path {path!r} cannot be imported: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, MergeMethod)):
        raise ValueError(f"method class_path {path!r} does not name a MergeMethod subclass")
    return cls
