"""Safe parsing of user numbers such as eps = "8/255" and of NAME=VALUE options (never through eval)."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from typing import Any

from .errors import RobustTransferError


def parse_eps(value: float | int | str) -> float:
    """Return eps as a non-negative finite float; accepts ``0.5``, ``"0.5"``, ``"8/255"``."""
    if isinstance(value, bool):
        raise RobustTransferError(f"eps must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        eps = float(value)
    else:
        text = str(value).strip()
        try:
            if "/" in text:
                num, den = text.split("/", 1)
                eps = float(Fraction(num.strip()) / Fraction(den.strip()))
            else:
                eps = float(text)
        except (ValueError, ZeroDivisionError):
            raise RobustTransferError(
                f"cannot read eps {value!r}: give a number such as 0.5 or a fraction such as 8/255"
            ) from None
    if not math.isfinite(eps) or eps < 0:
        raise RobustTransferError(f"eps must be a finite number >= 0, got {value!r}")
    return eps


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """Architecture options from the command line: ``["img_size=32", "patch_size=4"]`` -> ``{"img_size": 32, ...}``.

    Each value is read as JSON (numbers, true/false, lists, quoted strings), else kept as a plain string.
    """
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise RobustTransferError(f"cannot read option {item!r}: write NAME=VALUE, e.g. img_size=32")
        try:
            options[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            options[key.strip()] = text
    return options
