"""Finding and replacing layers by dotted name: the stem convolution and the classifier head."""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..errors import RobustTransferError
from .normalization import NormalizedModel


def _inner(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, NormalizedModel) else model


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (e.g. ``"features.0.0"``) with ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """Dotted name and layer of the first `nn.Conv2d` in registration order (the stem)."""
    for name, module in _inner(model).named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise RobustTransferError(f"{type(_inner(model)).__name__} has no Conv2d layer to take the input images")


def replace_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Give ``model`` a stem conv taking ``in_channels`` channels (same kernel, stride, padding, bias).

    The new layer is freshly initialised (Kaiming, fan-out, as torchvision does); ``model`` is
    changed in place and returned. A no-op when the stem already takes ``in_channels``.
    """
    name, old = first_conv(model)
    if old.in_channels == in_channels:
        return model
    if old.groups != 1:
        raise RobustTransferError(f"cannot change the input channels of grouped stem conv {name!r}")
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    set_submodule(_inner(model), name, new)
    return model


def classifier_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The final `nn.Linear` of a classifier and its dotted name.

    For a `NormalizedModel` the name is relative to the inner classifier (``model.model``), e.g.
    ``"fc"`` for ResNets, ``"classifier"`` for DenseNet, ``"classifier.1"`` for MobileNet-v2 and
    MNASNet, ``"classifier.6"`` for VGG. "Final" means last in registration order, which is the
    output layer for every registered architecture; timm models name theirs (``pretrained_cfg["classifier"]``:
    ``"head"`` for ViT, ``"head.fc"`` for ConvNeXt and Swin), and that name is used while it is a Linear.
    """
    inner = _inner(model)
    declared = getattr(inner, "pretrained_cfg", None)  # timm declares its classifier's name
    name = declared.get("classifier") if isinstance(declared, Mapping) else None
    if isinstance(name, str):
        try:
            module = inner.get_submodule(name)
        except AttributeError:
            module = None
        if isinstance(module, nn.Linear):
            return name, module
    last: tuple[str, nn.Linear] | None = None
    for name, module in inner.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise RobustTransferError(
            f"{type(inner).__name__} has no nn.Linear layer, so it has no classifier head to replace"
        )
    return last
