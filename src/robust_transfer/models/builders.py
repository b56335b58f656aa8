"""A user's own architecture, named by an importable builder ``"package.module:function"``.

The builder (a function or a class) is called with the recorded keyword arguments and returns the bare
classifier (the module `with_normalization` wraps). Recording the builder is what makes a user's model
reloadable: our files hold weights and facts, never pickled code.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ..errors import RobustTransferError

_BUILDER = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def is_builder(arch: str) -> bool:
    """Whether ``arch`` has the shape of a builder reference, ``"package.module:function"``."""
    return isinstance(arch, str) and bool(_BUILDER.match(arch))


def resolve_builder(reference: str) -> Callable[..., nn.Module]:
    """Import the callable named by ``"package.module:attribute"``; a missing module or name is one line."""
    if not is_builder(reference):
        raise RobustTransferError(
            f"builder {reference!r} is not of the form 'package.module:function' (an importable function or class "
            "that returns the model)"
        )
    module_name, _, attribute = reference.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise RobustTransferError(
            f"cannot import {module_name!r} for builder {reference!r} ({error}); install the package that defines "
            "the model or put it on PYTHONPATH"
        ) from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise RobustTransferError(f"{module_name!r} has no {attribute!r} (builder {reference!r})")
        target = getattr(target, part)
    if not callable(target):
        raise RobustTransferError(f"builder {reference!r} is not callable")
    return target


def build_from(reference: str, options: Mapping[str, Any]) -> nn.Module:
    """Call the builder with ``options`` and check that it returned an nn.Module."""
    builder = resolve_builder(reference)
    try:
        model = builder(**options)
    except TypeError as error:
        raise RobustTransferError(
            f"builder {reference!r} does not accept the options {dict(options)}: {error}"
        ) from None
    if not isinstance(model, nn.Module):
        raise RobustTransferError(f"builder {reference!r} returned a {type(model).__name__}, not a torch nn.Module")
    return model


def class_reference(model: nn.Module) -> str:
    """``"module:QualifiedName"`` of the model's class, for messages that say how to make it reloadable."""
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"
