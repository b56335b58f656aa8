"""The architecture registry (one place) and the constructors `create_model` and `with_normalization`.

An architecture is named in one of three ways:

- a registered name (`ARCHITECTURES`): the paper's networks and small ones, built with torchvision's
  definitions or blocks, so state-dict names match torchvision's (and the robustness library's, after
  its prefixes are stripped);
- ``"timm:NAME"``: any architecture timm knows (`robust_transfer.models.timm_arch`);
- ``"package.module:function"``: a user's own builder (`robust_transfer.models.builders`).

Each is rebuilt from `ModelSpec` alone, which is what makes a saved model reloadable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from ..errors import RobustTransferError
from . import timm_arch
from .builders import build_from, class_reference, is_builder
from .normalization import IMAGENET_MEAN, IMAGENET_STD, Normalize, NormalizedModel
from .small import (
    CifarResNet,
    SmallResNet,
    cifar_resnet18,
    cifar_resnet50,
    small_resnet,
    small_resnet_w2,
    small_resnet_w4,
)
from .spec import ModelSpec, Stats, check_options, check_positive_int, resolve_stats
from .stages import replace_head
from .state import misfit
from .surgery import classifier_head, first_conv, replace_first_conv

CUSTOM = "custom"


@dataclass(frozen=True)
class Architecture:
    """One registry entry: how to build the bare classifier and which normalisation it defaults to.

    ``build(num_classes, in_channels)`` returns the classifier without normalisation; ``cls`` is
    its Python class (used to recognise a user's model in `with_normalization`); ``imagenet``
    says whether the default statistics for 3-channel input are ImageNet's (else 0.5). ``family`` and
    ``size`` place it among networks of one design from smallest to largest (the paper's width study:
    ResNet-18, ResNet-50, WRN-50-2, WRN-50-4); ``family`` is empty for a network without siblings.
    """

    name: str
    build: Callable[[int, int], nn.Module]
    cls: type[nn.Module]
    imagenet: bool
    description: str
    family: str = ""
    size: int = 0


def _torchvision(constructor: Callable[..., nn.Module]) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, in_channels: int) -> nn.Module:
        model = constructor(weights=None, num_classes=num_classes)
        return replace_first_conv(model, in_channels)

    return build


def _wide_resnet50_4(weights: None = None, num_classes: int = 1000) -> ResNet:
    # Not a torchvision constructor: WRN-50-2's definition with twice its width (64 * 4 per group).
    return ResNet(Bottleneck, [3, 4, 6, 3], width_per_group=64 * 4, num_classes=num_classes)


_ENTRIES = [
    Architecture("resnet18", _torchvision(tvm.resnet18), ResNet, True, "torchvision ResNet-18", "ResNet", 1),
    Architecture("resnet50", _torchvision(tvm.resnet50), ResNet, True, "torchvision ResNet-50", "ResNet", 2),
    Architecture("wide_resnet50_2", _torchvision(tvm.wide_resnet50_2), ResNet, True, "torchvision WRN-50-2", "ResNet",
                 3),
    Architecture(
        "wide_resnet50_4", _torchvision(_wide_resnet50_4), ResNet, True, "WRN-50-4 (width_per_group 256)", "ResNet", 4
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
    Architecture("cifar_resnet18", cifar_resnet18, CifarResNet, False, "ResNet-18 with a 32 px stem", "CifarResNet", 1),
    Architecture("cifar_resnet50", cifar_resnet50, CifarResNet, False, "ResNet-50 with a 32 px stem", "CifarResNet", 2),
    Architecture("small_resnet", small_resnet, SmallResNet, False, "0.3M-parameter ResNet for 28 px", "SmallResNet", 1),
    Architecture("small_resnet_w2", small_resnet_w2, SmallResNet, False, "small_resnet at twice the width (1.2M)",
                 "SmallResNet", 2),
    Architecture("small_resnet_w4", small_resnet_w4, SmallResNet, False, "small_resnet at four times the width (4.9M)",
                 "SmallResNet", 4),
]
ARCHITECTURES: dict[str, Architecture] = {entry.name: entry for entry in _ENTRIES}


def list_architectures() -> list[str]:
    """Registered names accepted by `create_model`, in registry order (``timm:NAME`` and builders come on top)."""
    return list(ARCHITECTURES)


def size_order(arch: str) -> tuple[str, int, str]:
    """A sort key placing each family's networks together, smallest first (the paper's width figure); an
    architecture outside the registry (timm, a builder) is a family of its own."""
    entry = ARCHITECTURES.get(arch)
    return (entry.family or arch, entry.size, arch) if entry else (arch, 0, arch)


def get_architecture(arch: str) -> Architecture:
    """The registry entry for ``arch``; an unknown name raises an error listing the valid ones."""
    try:
        return ARCHITECTURES[arch]
    except (KeyError, TypeError):
        raise RobustTransferError(
            f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}, or timm:NAME for any timm "
            "architecture, or package.module:function for your own builder"
        ) from None


def check_arch(arch: str) -> str:
    """``arch`` if it names a buildable architecture (registered, a timm name timm knows, or a builder)."""
    if timm_arch.is_timm(arch):
        timm_arch.timm_name(arch)
    elif not is_builder(arch):
        get_architecture(arch)
    return arch


def default_stats(
    arch: str | None, in_channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Default (mean, std): ImageNet's for a torchvision architecture on 3 channels, timm's declared statistics
    for a timm architecture, else 0.5 per channel."""
    if arch in ARCHITECTURES and ARCHITECTURES[arch].imagenet and in_channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if arch is not None and timm_arch.is_timm(arch):
        return timm_arch.default_stats(arch, in_channels)
    return (0.5,) * in_channels, (0.5,) * in_channels


def build_classifier(
    arch: str, num_classes: int, in_channels: int, options: Mapping[str, Any] | None = None,
    head_hidden: Sequence[int] = (),
) -> nn.Module:
    """The bare classifier (no normalisation) for ``arch``, freshly initialised; nothing is downloaded.

    A builder's model is given a new stem or head when its own do not take ``in_channels`` or predict
    ``num_classes``; ``head_hidden`` widths replace the head with an `MLPHead`.
    """
    options = check_options(options)
    if timm_arch.is_timm(arch):
        model = timm_arch.build_timm(arch, num_classes, in_channels, options)
    elif is_builder(arch):
        model = build_from(arch, options)
        if first_conv(model)[1].in_channels != in_channels:
            replace_first_conv(model, in_channels)
        if classifier_head(model)[1].out_features != num_classes:
            replace_head(model, num_classes)
    else:
        if options:
            raise RobustTransferError(
                f"{arch} takes no architecture options (got {', '.join(options)}); they are for timm:NAME and builders"
            )
        model = get_architecture(arch).build(num_classes, in_channels)
    if head_hidden:
        replace_head(model, num_classes, hidden=head_hidden)
    return model


def create_model(
    arch: str,
    num_classes: int = 1000,
    in_channels: int = 3,
    mean: Stats | None = None,
    std: Stats | None = None,
    head_hidden: Sequence[int] = (),
    image_size: int | None = None,
    **options: Any,
) -> NormalizedModel:
    """Build a freshly initialised ``arch`` (no weights are downloaded) with normalisation in front.

    ``arch`` is a registered name (`list_architectures`), ``"timm:NAME"`` for any timm architecture
    (``options`` go to ``timm.create_model``, e.g. ``img_size=32, patch_size=4``), or
    ``"package.module:function"``, a builder of your own that returns the bare classifier (called with
    ``options``). ``mean`` / ``std`` default to ImageNet's statistics for torchvision architectures on
    3-channel input, to timm's declared statistics for timm architectures, and to 0.5 per channel
    otherwise; a single number is used for every channel. ``image_size`` (pixels) sets ``img_size`` for
    timm architectures with a fixed input size (ViT, Swin, XCiT) when it differs from their default.
    ``head_hidden`` widths replace the architecture's head with an `MLPHead` (Linear, ReLU, ..., Linear),
    the head transfer builds with hidden layers. The model takes [0, 1] images, NCHW, with
    ``in_channels`` channels. Building under ``torch.device("meta")`` gives a weightless model.
    """
    check_arch(arch)
    num_classes = check_positive_int(num_classes, "num_classes")
    in_channels = check_positive_int(in_channels, "in_channels")
    if timm_arch.is_timm(arch):
        options = timm_arch.size_options(arch, image_size, options)
    options = check_options(options)
    default_mean, default_std = default_stats(arch, in_channels)
    spec = ModelSpec(
        arch=arch,
        num_classes=num_classes,
        in_channels=in_channels,
        mean=resolve_stats(mean, in_channels, default_mean, "mean"),
        std=resolve_stats(std, in_channels, default_std, "std"),
        head_hidden=tuple(head_hidden),
        options=options,
    )
    return NormalizedModel(build_classifier(arch, num_classes, in_channels, options, spec.head_hidden),
                           Normalize(spec.mean, spec.std), spec)


def rebuild(spec: ModelSpec) -> NormalizedModel:
    """A freshly initialised model of the architecture ``spec`` describes (weights are loaded by the caller)."""
    if spec.arch == CUSTOM:
        raise RobustTransferError("a custom model without a recorded builder cannot be rebuilt")
    inner = build_classifier(spec.arch, spec.num_classes or 1, spec.in_channels, spec.options, spec.head_hidden)
    return NormalizedModel(inner, Normalize(spec.mean, spec.std), spec)


def _fits(model: nn.Module, arch: str, num_classes: int, in_channels: int,
          options: Mapping[str, Any] | None = None, head_hidden: Sequence[int] = ()) -> str | None:
    """None when ``arch`` (with ``options``) rebuilds ``model``'s exact state-dict layout, else what differs."""
    with torch.device("meta"):
        reference = build_classifier(arch, num_classes, in_channels, options, head_hidden)
    return misfit(reference.state_dict(), model.state_dict())


def _recognise(model: nn.Module, num_classes: int | None, in_channels: int) -> str:
    if num_classes is None:
        return CUSTOM
    for entry in _ENTRIES:
        if type(model) is entry.cls and _fits(model, entry.name, num_classes, in_channels) is None:
            return entry.name
    declared = getattr(model, "pretrained_cfg", None)  # timm models carry the name they were built under
    name = declared.get("architecture") if isinstance(declared, Mapping) else None
    if isinstance(name, str) and timm_arch.timm.is_model(name):
        arch = timm_arch.PREFIX + name
        if _fits(model, arch, num_classes, in_channels) is None:
            return arch
    return CUSTOM


def with_normalization(
    model: nn.Module,
    mean: Stats,
    std: Stats,
    arch: str | None = None,
    builder: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> NormalizedModel:
    """Put a `Normalize` layer in front of a classifier that expects normalised inputs.

    The result takes [0, 1] images. ``spec.arch`` says how `load_model` rebuilds it: the registered
    architecture whose definition ``model`` matches (same class, state-dict names and shapes), the timm
    architecture it was built as (default options), ``builder`` (``"package.module:function"``, called
    with ``options``, checked to rebuild this exact layout), or ``"custom"`` otherwise (it saves, but
    reloading needs a builder: see `save_model`). Pass ``arch`` to state it (it is checked). A single
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
    options = check_options(options)
    if builder is not None:
        arch = CUSTOM  # recorded below, once checked to rebuild this layout
    if arch is None:
        arch = _recognise(model, num_classes, in_channels)
    elif arch != CUSTOM:
        check_arch(arch)
        problems = "it has no nn.Linear head" if num_classes is None else _fits(
            model, arch, num_classes, in_channels, options)
        if problems:
            raise RobustTransferError(
                f"the model does not match architecture {arch!r} ({problems}); "
                f"leave arch out to record it as {CUSTOM!r}"
            )
    spec = ModelSpec(
        arch=arch,
        num_classes=num_classes,
        in_channels=in_channels,
        mean=resolve_stats(mean, in_channels, 0.5, "mean"),
        std=resolve_stats(std, in_channels, 0.5, "std"),
        options=options if arch != CUSTOM else {},
    )
    wrapped = NormalizedModel(model, Normalize(spec.mean, spec.std), spec)
    return wrapped if builder is None else with_builder(wrapped, builder, options)


def with_builder(model: NormalizedModel, builder: str, options: Mapping[str, Any] | None = None) -> NormalizedModel:
    """Record ``builder`` (``"package.module:function"``) as the way to rebuild ``model``, after checking that it
    builds this exact layout (head and stem adapted to the spec's classes and channels); returns ``model``."""
    options = check_options(options)
    spec = model.spec
    if spec.num_classes is None:
        raise RobustTransferError("a model without an nn.Linear head cannot be rebuilt by a builder")
    problems = _fits(model.model, builder, spec.num_classes, spec.in_channels, options, spec.head_hidden)
    if problems:
        raise RobustTransferError(
            f"builder {builder!r} builds a model whose weights do not fit {class_reference(model.model)} ({problems}); "
            "give the builder's keyword arguments (options=...) or point at the function that built this model"
        )
    model.spec = dataclasses.replace(spec, arch=builder, options=options)
    return model


def resolve_normalization(
    carried: tuple[Sequence[float], Sequence[float]] | None,
    mean: Stats | None,
    std: Stats | None,
    arch: str,
    in_channels: int,
    source: str,
) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, where from): statistics a file carries, else the user's, else the architecture's default.

    Statistics given by the user must agree with those the file carries: a mismatch is an error,
    since it means one of them would normalise the images a second time or not at all.
    """
    if carried is not None:
        file_mean = resolve_stats(carried[0], in_channels, 0.5, "mean")
        file_std = resolve_stats(carried[1], in_channels, 0.5, "std")
        for given, found, what in ((mean, file_mean, "mean"), (std, file_std, "std")):
            if given is not None and not _close(resolve_stats(given, in_channels, 0.5, what), found):
                raise RobustTransferError(
                    f"{source} carries its own normalisation ({what} {list(found)}), which differs from the "
                    f"{what} you gave ({given}); leave mean/std out to use the file's"
                )
        return file_mean, file_std, "file"
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise RobustTransferError("give both mean and std (one value per channel), or neither")
        return resolve_stats(mean, in_channels, 0.5, "mean"), resolve_stats(std, in_channels, 0.5, "std"), "given"
    default_mean, default_std = default_stats(arch, in_channels)
    return default_mean, default_std, "default"


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-6 * max(1.0, abs(y)) for x, y in zip(a, b, strict=True))
