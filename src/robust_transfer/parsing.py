"""Safe parsing of user numbers such as eps = "8/255" (never through eval)."""

from __future__ import annotations

import math
from fractions import Fraction

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
