"""The detection objective on the training engine: a batch is a list of images and their targets, the loss is
the sum of the detector's losses (RPN objectness and boxes, box classification and regression, masks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..train.objectives import Objective


@dataclass
class DetectionObjective(Objective):
    """torchvision's detectors compute their own losses in training mode: this objective sums them."""

    def to_device(self, x: list[torch.Tensor], y: list[dict[str, Any]], device: torch.device):
        return ([image.to(device, non_blocking=True) for image in x],
                [{k: v.to(device, non_blocking=True) for k, v in target.items()} for target in y])

    def loss(self, model: nn.Module, attack_model: nn.Module, x, y) -> tuple[torch.Tensor, None]:
        losses = model(x, y)
        return torch.stack([value.float() for value in losses.values()]).sum(), None

    def tally(self, outputs: None, y) -> tuple[int, None]:
        return len(y), None
