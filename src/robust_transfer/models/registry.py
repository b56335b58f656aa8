"""The architecture registry (one place) and the constructors `create_model` and `with_normalization`.

Every architecture is built with torchvision's definitions or torchvision's blocks, so state-dict
names match torchvision's (and the robustness library's, after its prefixes are stripped).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from ..errors import RobustTransferError
from .normalization import IMAGENET_MEAN, IMAGENET_STD, Normalize, NormalizedModel
from .small import CifarResNet, SmallResNet, cifar_resnet18, cifar_resnet50, small_resnet
from .spec import ModelSpec, Stats, check_positive_int, resolve_stats
from .stages import replace_head
from .surgery import classifier_head, first_conv, replace_first_conv

CUSTOM = "custom"


@dataclass(frozen=True)
class Architecture:
    """One registry entry: how to build the bare classifier and which normalisation it defaults to.

    ``build(num_classes, in_channels)`` returns the classifier without normalisation; ``cls`` is
    its Python class (used to recognise a user's model in `with_normalization`); ``imagenet``
    says whether the default statistics for 3-channel input are ImageNet's (else 0.5).
    """

    name: str
    build: Callable[[int, int], nn.Module]
    cls: type[nn.Module]
    imagenet: bool
    description: str


def _torchvision(constructor: Callable[..., nn.Module]) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, in_channels: int) -> nn.Module:
        model = constructor(weights=None, num_classes=num_classes)
        return replace_first_conv(model, in_channels)

    return build


def _wide_resnet50_4(weights: None = None, num_classes: int = 1000) -> ResNet:
    # Not a torchvision constructor: WRN-50-2's definition with twice its width (64 * 4 per group).
    return ResNet(Bottleneck, [3, 4, 6, 3], width_per_group=64 * 4, num_classes=num_classes)


_ENTRIES = [
    Architecture("resnet18", _torchvision(tvm.resnet18), ResNet, True, "torchvision ResNet-18"),
    Architecture("resnet50", _torchvision(tvm.resnet50), ResNet, True, "torchvision ResNet-50"),
    Architecture("wide_resnet50_2", _torchvision(tvm.wide_resnet50_2), ResNet, True, "torchvision WRN-50-2"),
    Architecture(
        "wide_resnet50_4", _torchvision(_wide_resnet50_4), ResNet, True, "WRN-50-4 (width_per_group 256)"
    ),
    Architecture(
        "densenet161", _torchvision(tvm.densenet161), tvm.DenseNet, True, "torchvision DenseNet-161"
    ),
    Architecture("mnasnet1_0", _torchvision(tvm.mnasnet1_0), tvm.MNASNet, True, "torchvision MNASNet-1.0"),
    Architecture(
        "mobilenet_v2", _torchvision(tvm.mobilenet_v2), tvm.MobileNetV2, True, "torchvision MobileNet-v2"
    ),
    Architecture(
        "resnext50_32x4d", _torchvision(tvm.resnext50_32x4d), ResNet, True, "torchvision ResNeXt-50 32x4d"
    ),
    Architecture(
        "shufflenet_v2_x1_0",
        _torchvision(tvm.shufflenet_v2_x1_0),
        tvm.ShuffleNetV2,
        True,
        "torchvision ShuffleNet-v2 x1.0",
    ),
    Architecture("vgg16_bn", _torchvision(tvm.vgg16_bn), tvm.VGG, True, "torchvision VGG-16 with batch norm"),
    Architecture("cifar_resnet18", cifar_resnet18, CifarResNet, False, "ResNet-18 with a 32 px stem"),
    Architecture("cifar_resnet50", cifar_resnet50, CifarResNet, False, "ResNet-50 with a 32 px stem"),
    Architecture("small_resnet", small_resnet, SmallResNet, False, "0.3M-parameter ResNet for 28 px"),
]
ARCHITECTURES: dict[str, Architecture] = {entry.name: entry for entry in _ENTRIES}


def list_architectures() -> list[str]:
    """Names accepted by `create_model`, in registry order."""
    return list(ARCHITECTURES)


def get_architecture(arch: str) -> Architecture:
    """The registry entry for ``arch``; an unknown name raises an error listing the valid ones."""
    try:
        return ARCHITECTURES[arch]
    except (KeyError, TypeError):
        raise RobustTransferError(
            f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}"
        ) from None


def default_stats(arch: str | None, in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Default (mean, std): ImageNet's for a torchvision architecture on 3 channels, else 0.5 per channel."""
    if arch in ARCHITECTURES and ARCHITECTURES[arch].imagenet and in_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * in_channels, (0.5,) * in_channels


def create_model(
    arch: str,
    num_classes: int = 1000,
    in_channels: int = 3,
    mean: Stats | None = None,
    std: Stats | None = None,
    head_hidden: Sequence[int] = (),
) -> NormalizedModel:
    """Build a freshly initialised ``arch`` (no weights are downloaded) with normalisation in front.

    ``mean`` / ``std`` default to ImageNet's statistics for torchvision architectures on
    3-channel input and to 0.5 per channel otherwise; a single number is used for every channel.
    ``head_hidden`` widths replace the architecture's head with an `MLPHead` (Linear, ReLU, ...,
    Linear), the head transfer builds with hidden layers. The model takes [0, 1] images, NCHW,
    with ``in_channels`` channels. Building under ``torch.device("meta")`` gives a weightless
    model (for shapes and parameter counts).
    """
    entry = get_architecture(arch)
    num_classes = check_positive_int(num_classes, "num_classes")
    in_channels = check_positive_int(in_channels, "in_channels")
    default_mean, default_std = default_stats(arch, in_channels)
    spec = ModelSpec(
        arch=arch,
        num_classes=num_classes,
        in_channels=in_channels,
        mean=resolve_stats(mean, in_channels, default_mean, "mean"),
        std=resolve_stats(std, in_channels, default_std, "std"),
    )
    model = NormalizedModel(entry.build(num_classes, in_channels), Normalize(spec.mean, spec.std), spec)
    if head_hidden:
        replace_head(model, num_classes, hidden=head_hidden)
    return model


def _signature(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _fits(model: nn.Module, arch: str, num_classes: int, in_channels: int) -> bool:
    with torch.device("meta"):
        reference = get_architecture(arch).build(num_classes, in_channels)
    return _signature(reference) == _signature(model)


def _recognise(model: nn.Module, num_classes: int | None, in_channels: int) -> str:
    if num_classes is None:
        return CUSTOM
    for entry in _ENTRIES:
        if type(model) is entry.cls and _fits(model, entry.name, num_classes, in_channels):
            return entry.name
    return CUSTOM


def with_normalization(
    model: nn.Module,
    mean: Stats,
    std: Stats,
    arch: str | None = None,
) -> NormalizedModel:
    """Put a `Normalize` layer in front of a classifier that expects normalised inputs.

    The result takes [0, 1] images. ``spec.arch`` is the registered architecture whose
    definition ``model`` matches (same class, state-dict names and shapes), so `load_model` can
    rebuild it, or ``"custom"`` otherwise; pass ``arch`` to state it (it is checked). A single
    number for ``mean`` / ``std`` is used for every input channel.
    """
    if isinstance(model, NormalizedModel):
        raise RobustTransferError(
            "this model already has its normalisation in front; wrapping it again would normalise twice"
        )
    if not isinstance(model, nn.Module):
        raise RobustTransferError(f"with_normalization needs a torch nn.Module, got {type(model).__name__}")
    try:
        in_channels = first_conv(model)[1].in_channels
    except RobustTransferError:
        in_channels = len(mean) if isinstance(mean, Sequence) else 3
    try:
        num_classes: int | None = classifier_head(model)[1].out_features
    except RobustTransferError:
        num_classes = None
    if arch is None:
        arch = _recognise(model, num_classes, in_channels)
    elif arch != CUSTOM:
        get_architecture(arch)
        if num_classes is None or not _fits(model, arch, num_classes, in_channels):
            raise RobustTransferError(
                f"the model does not match architecture {arch!r} (different layers or shapes); "
                f"leave arch out to record it as {CUSTOM!r}"
            )
    spec = ModelSpec(
        arch=arch,
        num_classes=num_classes,
        in_channels=in_channels,
        mean=resolve_stats(mean, in_channels, 0.5, "mean"),
        std=resolve_stats(std, in_channels, 0.5, "std"),
    )
    return NormalizedModel(model, Normalize(spec.mean, spec.std), spec)
