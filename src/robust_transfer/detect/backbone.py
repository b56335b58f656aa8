"""A source classifier as a detection backbone: its stages' feature maps through a feature pyramid.

The stages are the ones partial transfer freezes (`robust_transfer.models.stages`); each contributes the
output of its last module that computes a feature map: timm models name those modules in their own
``feature_info``, other architectures are read from one probe forward pass. An FPN
(torchvision's) turns them into maps of one width, plus a max-pooled level above the last, as the
Faster / Mask R-CNN papers and detectron2 build it. Every BatchNorm of the source becomes a
`FrozenBatchNorm2d` (detectron2's setting for these transfers): with a few images per batch, batch
statistics would be noise, so the source's running statistics are kept, as constants.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..errors import RobustTransferError
from ..models.stages import classifier_of, declared_boundaries, stages

PROBE_SIZES = (64, 224)  # pixels: real forward passes, in eval mode and without gradients; 224 for fixed-size models


def freeze_batchnorm(module: nn.Module) -> int:
    """Replace every BatchNorm2d under ``module`` (in place) by a FrozenBatchNorm2d holding its statistics; returns
    how many were replaced."""
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                if child.affine:
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                if child.track_running_stats:
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen.to(child.weight.device if child.affine else frozen.weight.device))
            replaced += 1
        else:
            replaced += freeze_batchnorm(child)
    return replaced


def _probe(classifier: nn.Module, names: list[str], in_channels: int) -> tuple[dict[str, tuple[int, int, int]], int]:
    """Name -> (channels, height, width) of each named module's 4-D output on a probe image, and the probe's side."""
    found: dict[str, tuple[int, int, int]] = {}

    def hook(name: str):
        def record(_module, _inputs, output) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                found[name] = tuple(output.shape[1:])
        return record

    handles = [classifier.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    training = classifier.training
    classifier.eval()
    parameter = next(classifier.parameters())
    try:
        for size in PROBE_SIZES:
            try:
                with torch.no_grad():
                    classifier(torch.zeros(1, in_channels, size, size, device=parameter.device, dtype=parameter.dtype))
                return found, size
            except (RuntimeError, AssertionError, ValueError) as error:  # a model built for one input size
                failure = error
        else:
            raise RobustTransferError(f"the source ({type(classifier).__name__}) does not run on a "
                                      f"{in_channels}-channel probe image: {str(failure).splitlines()[0][:200]}")
    finally:
        for handle in handles:
            handle.remove()
        classifier.train(training)


@dataclass(frozen=True)
class StageMaps:
    """The modules whose outputs are the stages' feature maps (``ends``), their channels and strides."""

    ends: list[str]
    channels: list[int]
    strides: list[int]


def stage_maps(model: nn.Module, in_channels: int) -> StageMaps:
    """The stages' feature maps of ``model``: which module ends each, with its channel count and stride.

    Raises a one-line error for a source without at least two stages that compute feature maps (a
    vision transformer's tokens, a model that is one block).
    """
    classifier = classifier_of(model)
    declared = declared_boundaries(classifier)
    if declared:
        candidates = [[name] for name in declared]
    else:
        modules = dict(classifier.named_modules())
        candidates = [[n for n in stage if n in modules] for stage in stages(model)]
    shapes, size = _probe(classifier, sorted({n for names in candidates for n in names}), in_channels)
    ends = []
    for names in candidates:
        spatial = [n for n in names if n in shapes and shapes[n][1] > 1]
        if spatial:
            ends.append(spatial[-1])
    arch = type(classifier).__name__
    if len(ends) < 2:
        raise RobustTransferError(
            f"the source ({arch}) has {len(ends)} stage(s) that compute feature maps, and a detector's feature "
            "pyramid needs at least 2: use a convolutional source (a ResNet, ConvNeXt, or any timm model with "
            "feature maps); vision transformers' tokens are not feature maps")
    return StageMaps(ends, [shapes[n][0] for n in ends], [max(1, round(size / shapes[n][1])) for n in ends])


class StageBackbone(nn.Module):
    """``forward(images)`` -> OrderedDict of FPN maps ``"0"``, ``"1"``, ... (fine to coarse) and ``"pool"``.

    ``body`` is the source's bare classifier (the detector normalises its inputs itself); its forward runs
    whole, hooks collecting the stages' outputs (its pooled head costs nothing next to them).
    """

    def __init__(self, classifier: nn.Module, ends: list[str], channels: list[int], out_channels: int) -> None:
        super().__init__()
        self.body = classifier
        self.ends = list(ends)
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}

        def hook(name: str):
            def record(_module, _inputs, output) -> None:
                found[name] = output
            return record

        handles = [self.body.get_submodule(n).register_forward_hook(hook(n)) for n in self.ends]
        try:
            self.body(x)
        finally:
            for handle in handles:
                handle.remove()
        return self.fpn(OrderedDict((str(i), found[n]) for i, n in enumerate(self.ends)))
