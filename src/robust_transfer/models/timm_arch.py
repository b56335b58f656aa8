"""timm architectures as first-class sources: ``create_model("timm:NAME", ...)`` for any name timm knows.

timm declares what we need when it builds a model, so nothing is probed: the normalisation and input
size in its pretrained config, the classifier's name (``pretrained_cfg["classifier"]``) and the
feature stages (``feature_info``, read by `robust_transfer.models.stages`). Models are built with
``pretrained=False``: nothing is downloaded, weights come from our files.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Mapping
from typing import Any

import timm
from torch import nn

from ..errors import RobustTransferError

PREFIX = "timm:"


def is_timm(arch: str) -> bool:
    """Whether ``arch`` names a timm architecture (``"timm:NAME"``)."""
    return isinstance(arch, str) and arch.startswith(PREFIX)


def timm_name(arch: str) -> str:
    """The timm model name in ``"timm:NAME"``, checked to be one timm knows (close matches listed if not)."""
    name = arch[len(PREFIX):]
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(PREFIX + c for c in close)}" if close else ""
        raise RobustTransferError(
            f"timm has no architecture {name!r}{hint} (timm {timm.__version__}: timm.list_models() lists them all)"
        )
    return name


def build_timm(arch: str, num_classes: int, in_channels: int, options: Mapping[str, Any]) -> nn.Module:
    """``timm.create_model(NAME, pretrained=False, num_classes=, in_chans=, **options)``; a bad option is one line."""
    name = timm_name(arch)
    reserved = sorted({"pretrained", "num_classes", "in_chans", "checkpoint_path"} & set(options))
    if reserved:
        raise RobustTransferError(
            f"option(s) {', '.join(reserved)} are set by robust-transfer itself; use num_classes= and in_channels= "
            "and load weights with load_model"
        )
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **options)
    except TypeError as error:  # an option this architecture's constructor does not take
        raise RobustTransferError(f"timm's {name} does not accept the options {dict(options)}: {error}") from None


def convert_checkpoint(model: nn.Module, state: Mapping[str, Any]) -> dict[str, Any] | None:
    """``state`` in the current timm layout, by timm's own converter for the model's family (its module's
    ``checkpoint_filter_fn``: older timm versions' names, original repositories' layouts, dropped buffers);
    None when the family has none or it cannot convert ``state``."""
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is None:
        return None
    try:
        return dict(convert(dict(state), model))
    except Exception:  # a converter that does not recognise this layout: the caller reports the misfit
        return None


def pretrained_config(arch: str) -> dict[str, Any]:
    """timm's declared defaults for ``arch``: mean, std, input_size, interpolation, crop_pct, classifier, ..."""
    return timm.get_pretrained_cfg(timm_name(arch)).to_dict()


def default_stats(arch: str, in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """timm's normalisation for ``arch``; for another channel count than it declares, the channel average."""
    config = pretrained_config(arch)
    mean, std = tuple(config.get("mean") or (0.5,)), tuple(config.get("std") or (0.5,))
    if len(mean) == in_channels and len(std) == in_channels:
        return mean, std
    return (sum(mean) / len(mean),) * in_channels, (sum(std) / len(std),) * in_channels


def size_options(arch: str, image_size: int | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` plus ``img_size=image_size`` for architectures that declare a fixed input size (ViT, Swin,
    XCiT, ...) when the user did not set it, so a model built for training on 32 px data takes 32 px."""
    if image_size is None or "img_size" in options:
        return dict(options)
    config = pretrained_config(arch)
    declared = config.get("input_size") or (3, 224, 224)
    if config.get("fixed_input_size") and tuple(declared[1:]) != (image_size, image_size):
        return {**options, "img_size": image_size}
    return dict(options)
