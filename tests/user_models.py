"""A user's own architecture, importable as ``tests.user_models:tiny_cnn`` (the builder tests record)."""

from __future__ import annotations

from torch import nn


class TinyCNN(nn.Module):
    """Two convolutions, global pooling and a linear head: a model no registry knows."""

    def __init__(self, width: int = 8, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def tiny_cnn(width: int = 8, num_classes: int = 10, in_channels: int = 1) -> TinyCNN:
    return TinyCNN(width, num_classes, in_channels)
