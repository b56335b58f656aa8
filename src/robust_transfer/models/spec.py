"""`ModelSpec`: the few facts needed to rebuild a model (architecture, classes, channels, normalisation)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import RobustTransferError

Stats = Sequence[float] | float


def resolve_stats(
    values: Stats | None, in_channels: int, default: float | Sequence[float], what: str
) -> tuple[float, ...]:
    """Turn a user's mean or std into one float per channel.

    ``values`` may be None (use ``default``), a single number (repeated for every channel) or a
    sequence with exactly ``in_channels`` numbers.
    """
    if values is None:
        values = default
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [float(values)] * in_channels
    try:
        out = tuple(float(v) for v in values)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise RobustTransferError(f"{what} must be a number or a list of numbers, got {values!r}") from None
    if len(out) != in_channels:
        raise RobustTransferError(
            f"{what} has {len(out)} values but the model takes {in_channels}-channel images; "
            f"give one value per channel"
        )
    if not all(math.isfinite(v) for v in out):
        raise RobustTransferError(f"{what} must be finite numbers, got {out}")
    if what == "std" and not all(v > 0 for v in out):
        raise RobustTransferError(f"std must be > 0 for every channel, got {out}")
    return out


def check_options(options: Any) -> dict[str, Any]:
    """Constructor keyword arguments as a JSON-ready dict of name -> value, or a clear error."""
    if options is None:
        return {}
    if not isinstance(options, Mapping) or not all(isinstance(k, str) and k.isidentifier() for k in options):
        raise RobustTransferError(f"architecture options must map argument names to values, got {options!r}")
    try:
        return json.loads(json.dumps(dict(options)))
    except (TypeError, ValueError):
        raise RobustTransferError(
            f"architecture options must be JSON values (numbers, strings, lists), got {options!r}"
        ) from None


def check_positive_int(value: Any, what: str) -> int:
    """Return ``value`` as an int >= 1 or raise a `RobustTransferError` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RobustTransferError(f"{what} must be a whole number >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """What a saved model needs to be rebuilt:
    ``create_model(arch, num_classes, in_channels, mean, std, head_hidden=head_hidden, **options)``.

    ``arch`` is a registered architecture name, ``"timm:NAME"`` (any timm architecture), an importable
    builder ``"package.module:function"`` (a user's own model), or ``"custom"`` (a model that cannot
    be rebuilt: no builder was recorded). ``options`` are the keyword arguments of the architecture's
    constructor (timm's ``img_size``, a builder's own arguments), JSON values. ``num_classes`` is None
    for a custom model without a final Linear layer. ``head_hidden`` holds the hidden widths of an MLP
    head put in by transfer (``replace_head(..., hidden=...)``); empty for the architecture's own head.
    """

    arch: str
    num_classes: int | None
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    head_hidden: tuple[int, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists); ``head_hidden`` and ``options`` only when non-empty, as older
        files lack them."""
        out: dict[str, Any] = {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.head_hidden:
            out["head_hidden"] = list(self.head_hidden)
        if self.options:
            out["options"] = dict(self.options)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Read a spec written by `to_dict`, with a clear error for a missing or bad field."""
        if not isinstance(data, Mapping):
            raise RobustTransferError(f"model spec must be a JSON object, got {type(data).__name__}")
        missing = [k for k in ("arch", "num_classes", "in_channels", "mean", "std") if k not in data]
        if missing:
            raise RobustTransferError(
                f"model spec is missing {', '.join(missing)}; re-save the model with save_model"
            )
        arch = data["arch"]
        if not isinstance(arch, str) or not arch:
            raise RobustTransferError(f"model spec 'arch' must be a non-empty string, got {arch!r}")
        in_channels = check_positive_int(data["in_channels"], "in_channels")
        num_classes = data["num_classes"]
        if num_classes is not None:
            num_classes = check_positive_int(num_classes, "num_classes")
        mean = resolve_stats(data["mean"], in_channels, 0.5, "mean")
        std = resolve_stats(data["std"], in_channels, 0.5, "std")
        hidden = data.get("head_hidden", [])
        if not isinstance(hidden, Sequence) or isinstance(hidden, str):
            raise RobustTransferError(f"model spec 'head_hidden' must be a list of widths, got {hidden!r}")
        head_hidden = tuple(check_positive_int(width, "a hidden head width") for width in hidden)
        options = data.get("options", {})
        if not isinstance(options, Mapping):
            raise RobustTransferError(f"model spec 'options' must be a JSON object, got {options!r}")
        return cls(arch=arch, num_classes=num_classes, in_channels=in_channels, mean=mean, std=std,
                   head_hidden=head_hidden, options=dict(options))
