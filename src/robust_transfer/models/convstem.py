"""ConvNeXt and ViT with a convolutional stem (Singh, Croce and Hein 2023, "Revisiting Adversarial Training for
ImageNet"), in the layer names their released checkpoints use, so those files load as they are.

The stem is a stack of 3x3 stride-2 convolutions, each followed by a channels-first LayerNorm and GELU,
held in an ``nn.Sequential`` called ``stem``: ConvNeXt's ``stem`` and ViT's ``patch_embed.proj`` are
replaced by it, so the keys read ``stem.stem.0.weight`` and ``patch_embed.proj.stem.0.weight``. The rest
of each network is timm's.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from ..errors import RobustTransferError


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW tensor (ConvNeXt's ``data_format="channels_first"``), eps 1e-6."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvStem(nn.Module):
    """Conv 3x3 -> LayerNorm -> GELU per width in ``widths`` (stride 2, or 1 where ``strides`` says), then an
    optional 1x1 projection to ``out_channels``."""

    def __init__(self, widths: list[int], strides: list[int], out_channels: int | None = None,
                 in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for width, stride in zip(widths, strides, strict=True):
            layers += [nn.Conv2d(previous, width, 3, stride=stride, padding=1), ChannelsFirstLayerNorm(width),
                       nn.GELU()]
            previous = width
        if out_channels is not None:
            layers.append(nn.Conv2d(previous, out_channels, 1))
        self.stem = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)


# base -> (timm architecture, stem widths, stem strides, 1x1 projection width or None)
_BASES: dict[str, tuple[str, list[int], list[int], int | None]] = {
    "convnext_t": ("convnext_tiny", [48, 96], [2, 2], None),
    "convnext_s": ("convnext_small", [48, 96], [2, 2], None),
    "convnext_b": ("convnext_base", [64, 96, 128], [2, 2, 1], None),
    "convnext_l": ("convnext_large", [96, 144, 192], [2, 2, 1], None),
    "vit_s": ("deit_small_patch16_224", [48, 96, 192, 384], [2, 2, 2, 2], 384),
    "vit_b": ("vit_base_patch16_224", [48, 96, 192, 384], [2, 2, 2, 2], 768),
}


def convstem_model(base: str, num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    """timm's ``base`` network (convnext_t/s/b/l, vit_s/b) with Singh et al.'s convolutional stem, untrained."""
    if base not in _BASES:
        raise RobustTransferError(f"unknown ConvStem base {base!r}; choose one of: {', '.join(_BASES)}")
    name, widths, strides, projection = _BASES[base]
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    stem = ConvStem(widths, strides, projection, in_channels=in_chans)
    if projection is None:
        model.stem = stem
    else:
        model.patch_embed.proj = stem
    return model
