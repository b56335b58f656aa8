"""Shared fixtures: small real models and data built in the test itself (no network)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyConvNet(nn.Module):
    """A conv net with BatchNorm, so eval/train mode matters to an attack."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@pytest.fixture
def tiny_net() -> TinyConvNet:
    torch.manual_seed(0)
    return TinyConvNet()


@pytest.fixture(scope="session")
def separable_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class images whose class is the brightness of the left half: easy to learn, easy to attack."""
    generator = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (256,), generator=generator)
    x = torch.rand(256, 1, 8, 8, generator=generator) * 0.2 + 0.4
    x[:, :, :, :4] += (y.float() * 2 - 1).view(-1, 1, 1, 1) * 0.15
    return x.clamp(0, 1), y


@pytest.fixture(scope="session")
def linear_model(separable_data) -> nn.Module:
    """A logistic-regression classifier trained to high accuracy on ``separable_data``."""
    torch.manual_seed(0)
    x, y = separable_data
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()
