"""The registry's torchvision architectures in timm's names: the same layers, registered in the same order,
for reading timm-named state dicts of those architectures and for exporting to timm."""

from __future__ import annotations

import timm
import torch
from torch import nn

from ...errors import RobustTransferError
from ..registry import get_architecture
from .architectures import classes_and_channels, probe_module

TIMM_NAMES = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "wide_resnet50_2": "wide_resnet50_2",
    "resnext50_32x4d": "resnext50_32x4d",
    "densenet161": "densenet161",
    "mobilenet_v2": "mobilenetv2_100",
    "mnasnet1_0": "mnasnet_100",
    "vgg16_bn": "vgg16_bn",
}
"""Registry architectures that timm also defines, with timm's name (same layers, same numbers)."""

TIMM_SAME_KEYS = frozenset({"resnet18", "resnet50", "wide_resnet50_2", "resnext50_32x4d", "densenet161"})
"""Architectures whose timm state-dict names are torchvision's; the others are mapped in order."""

_TIMM_MARKERS = ("conv_stem.weight", "pre_logits.fc1.weight", "head.fc.weight")


def timm_reference(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """timm's model for ``arch``, built weightless on the meta device (pretrained=False: nothing is downloaded)."""
    with torch.device("meta"):
        return timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=num_classes, in_chans=in_channels)


def timm_key_map(arch: str, num_classes: int = 1000, in_channels: int = 3) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(torchvision name, timm name, timm shape)`` for every tensor of ``arch``, in state-dict order.

    The two definitions register the same layers in the same order (checked: same count and the
    same number of elements per tensor); VGG's first two classifier layers are convolutions in
    timm, so their weights are reshaped.
    """
    if arch not in TIMM_NAMES:
        raise RobustTransferError(
            f"timm has no architecture matching {arch!r}; export it as torchvision or safetensors instead "
            f"(timm has: {', '.join(TIMM_NAMES)})"
        )
    entry = get_architecture(arch)
    with torch.device("meta"):
        ours = entry.build(num_classes, in_channels).state_dict()
    if arch in TIMM_SAME_KEYS:
        return [(k, k, tuple(v.shape)) for k, v in ours.items()]
    theirs = timm_reference(arch, num_classes, in_channels).state_dict()
    pairs = list(zip(ours.items(), theirs.items(), strict=False))
    if len(ours) != len(theirs) or any(a.numel() != b.numel() for (_, a), (_, b) in pairs):
        raise RobustTransferError(
            f"this timm version's {TIMM_NAMES[arch]} no longer matches torchvision's {arch} layer for layer; "
            "export it as torchvision or safetensors instead"
        )
    return [(ka, kb, tuple(b.shape)) for (ka, _), (kb, b) in pairs]


def from_timm_names(weights: dict[str, torch.Tensor], arch: str | None) -> tuple[dict, str] | None:
    """Map a timm-named state dict of a registry architecture whose timm names differ to torchvision names;
    None when it is not one."""
    if not any(marker in weights for marker in _TIMM_MARKERS):
        return None
    if arch is not None and arch not in TIMM_NAMES:
        return None
    candidates = [a for a in ([arch] if arch else TIMM_NAMES) if a not in TIMM_SAME_KEYS]
    for candidate in candidates:
        found = probe_module(timm_reference(candidate, 1000, 3))
        if frozenset(weights) != found.keys:
            continue
        num_classes, in_channels = classes_and_channels(weights, found)
        mapping = timm_key_map(candidate, num_classes, in_channels)
        with torch.device("meta"):
            ours = get_architecture(candidate).build(num_classes, in_channels).state_dict()
        converted = {}
        for tv_key, timm_key, _ in mapping:
            tensor = weights[timm_key]
            if tensor.numel() != ours[tv_key].numel():
                break
            converted[tv_key] = tensor.reshape(ours[tv_key].shape)
        else:
            return converted, candidate
    return None
