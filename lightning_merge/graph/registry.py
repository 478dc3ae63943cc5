"""The handler table: one entry per module type, torch function or Tensor method name.

Keys: an ``nn.Module`` subclass (looked up along the MRO, so subclasses inherit the handler), a
dotted class path string such as ``"lightning_merge.models.heads.ClassEmbedding"`` (matched without
importing it), a function object (``torch.flatten``, ``operator.add``) or a Tensor method name
(``"view"``). A handler takes an :class:`~lightning_merge.graph.state.Op` and returns the output
layout (a ``Layout``, or a tuple of them for tuple outputs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .state import Op

Handler = Callable[[Op], Any]

MODULE_HANDLERS: dict[type | str, Handler] = {}
FUNCTION_HANDLERS: dict[Any, Handler] = {}
METHOD_HANDLERS: dict[str, Handler] = {}


def register_handler(*keys: Any) -> Callable[[Handler], Handler]:
    """Decorator: use ``fn`` for every key (module types, dotted class paths, functions, method names)."""

    def deco(fn: Handler) -> Handler:
        for key in keys:
            module_type = isinstance(key, type) and issubclass(key, nn.Module)
            if module_type or (isinstance(key, str) and "." in key):
                MODULE_HANDLERS[key] = fn
            elif isinstance(key, str):
                METHOD_HANDLERS[key] = fn
            elif callable(key):
                FUNCTION_HANDLERS[key] = fn
            else:
                raise TypeError(f"register_handler: cannot use {key!r} as a key")
        return fn

    return deco


def module_handler(module: nn.Module, extra: dict | None = None) -> Handler | None:
    """Handler for a module instance: exact class path first, then along the MRO.

    A subclass inherits its base's handler only when it keeps the base's ``forward``: torchvision's
    ``LayerNorm2d`` subclasses ``nn.LayerNorm`` but normalises the channels of an NCHW map, so the
    LayerNorm rule would silently leave its affine parameters out. Such a subclass is traced into.
    """
    tables = [extra or {}, MODULE_HANDLERS]
    forward = type(module).forward
    for cls in type(module).__mro__:
        if cls is nn.Module:
            break
        for table in tables:
            path = f"{cls.__module__}.{cls.__qualname__}"
            key = cls if cls in table else path if path in table else None
            if key is None:
                continue
            return table[key] if cls.forward is forward else None
    return None


def op_handler(op: str, target: Any, extra: dict | None = None) -> Handler | None:
    if extra and target in extra:
        return extra[target]
    if op == "call_method":
        return METHOD_HANDLERS.get(target)
    try:
        return FUNCTION_HANDLERS.get(target)
    except TypeError:  # unhashable target
        return None
