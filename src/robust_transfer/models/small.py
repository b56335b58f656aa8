"""ResNets for small images: CIFAR-style ResNet-18/50 (32 px) and `SmallResNet` (28 px, e.g. Fashion-MNIST).

Both reuse torchvision's `BasicBlock` / `Bottleneck` and torchvision's attribute names
(``conv1``, ``bn1``, ``layer1`` ..., ``fc``), so freeze levels, head surgery and state-dict
names work as for the ImageNet ResNets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


def _init_conv(conv: nn.Conv2d) -> None:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class CifarResNet(ResNet):
    """torchvision's ResNet with a CIFAR stem: 3x3 stride-1 ``conv1`` and no max-pool.

    Feature maps are 32, 16, 8, 4 px for a 32 px input; the state-dict names are those of
    torchvision's ResNet (``maxpool`` is an `nn.Identity` with no parameters).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__(block, layers, num_classes=num_classes)
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        _init_conv(self.conv1)
        self.maxpool = nn.Identity()


def cifar_resnet18(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR-style ResNet-18 (11.2M parameters for 10 classes)."""
    return CifarResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels)


def cifar_resnet50(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR-style ResNet-50 (23.5M parameters for 10 classes)."""
    return CifarResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels)


class SmallResNet(nn.Module):
    """A small ResNet for 28 px images: 3x3 stem, three stages of one `BasicBlock`, pool, fc.

    Widths (32, 64, 128), strides (1, 2, 2): feature maps are 28, 14, 7 px. About 0.31M
    parameters for 1 input channel and 10 classes (308,074 exactly), about 37M multiply-adds per
    28x28 image. Attribute names follow torchvision's ResNet: ``conv1``, ``bn1``,
    ``layer1`` .. ``layer3``, ``fc``.
    """

    batchnorm_after = {"conv1": "bn1"}  # forward applies bn1 straight to conv1's output (robust_transfer.folding)

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64, 128),
        strides: Sequence[int] = (1, 2, 2),
    ) -> None:
        super().__init__()
        if len(widths) != 3 or len(strides) != 3:
            raise ValueError("SmallResNet has exactly three stages")
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(widths[0], widths[0], strides[0])
        self.layer2 = self._stage(widths[0], widths[1], strides[1])
        self.layer3 = self._stage(widths[1], widths[2], strides[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _init_conv(m)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _stage(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or in_planes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        return nn.Sequential(BasicBlock(in_planes, planes, stride=stride, downsample=downsample))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def small_resnet(num_classes: int = 10, in_channels: int = 1) -> SmallResNet:
    """`SmallResNet` with the default widths (32, 64, 128) and strides (1, 2, 2)."""
    return SmallResNet(num_classes=num_classes, in_channels=in_channels)


def small_resnet_w2(num_classes: int = 10, in_channels: int = 1) -> SmallResNet:
    """`SmallResNet` at twice the width (64, 128, 256): 1.2M parameters, for width studies on small images."""
    return SmallResNet(num_classes=num_classes, in_channels=in_channels, widths=(64, 128, 256))


def small_resnet_w4(num_classes: int = 10, in_channels: int = 1) -> SmallResNet:
    """`SmallResNet` at four times the width (128, 256, 512): 4.9M parameters."""
    return SmallResNet(num_classes=num_classes, in_channels=in_channels, widths=(128, 256, 512))
