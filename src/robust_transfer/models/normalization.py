"""The normalisation layer every model carries in front, so that all models take [0, 1] images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import RobustTransferError
from .spec import ModelSpec

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel for NCHW images in [0, 1].

    ``mean`` and ``std`` are buffers shaped ``[1, C, 1, 1]`` (saved in the state dict, moved by
    ``.to()``). The output keeps the input's dtype and memory format, so it works unchanged with
    channels_last inputs and under bf16 autocast.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if mean_t.shape != std_t.shape:
            raise RobustTransferError(
                f"mean has {mean_t.shape[1]} values but std has {std_t.shape[1]}; "
                "give one of each per channel"
            )
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    @property
    def in_channels(self) -> int:
        """Number of image channels this layer expects."""
        return self.mean.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise RobustTransferError(
                f"model expects NCHW images with {self.mean.shape[1]} channels, got shape {tuple(x.shape)}"
            )
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        mean = ", ".join(f"{v:.4g}" for v in self.mean.flatten().tolist())
        std = ", ".join(f"{v:.4g}" for v in self.std.flatten().tolist())
        return f"mean=({mean}), std=({std})"


class NormalizedModel(nn.Module):
    """A classifier with its input normalisation in front: ``forward(x) = model(normalize(x))``.

    Takes images in [0, 1], NCHW. ``spec`` records how to rebuild it (see `ModelSpec`);
    ``metadata`` holds what `load_model` read from the file (empty for a fresh model).
    """

    def __init__(self, model: nn.Module, normalize: Normalize, spec: ModelSpec) -> None:
        super().__init__()
        self.normalize = normalize
        self.model = model
        self.spec = spec
        self.metadata: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))
