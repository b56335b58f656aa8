"""Low-resolution targets: every image down to R x R pixels and back up to its size (the paper's 32 px study).

The image keeps its size, so the same model takes it; what it loses is the detail finer than R pixels.
"""

from __future__ import annotations

import dataclasses
import functools

from torch.utils.data import Dataset

from ..errors import RobustTransferError
from .memory import InMemoryDataset, PerItem
from .splits import DatasetSplits


def at_resolution(splits: DatasetSplits, resolution: int) -> DatasetSplits:
    """``splits`` with every image of every split resampled to ``resolution`` px and back (bilinear, antialiased).

    In-memory splits are resampled once; lazily decoded ones item by item, identically."""
    if resolution < 1:
        raise RobustTransferError(f"resolution must be a positive number of pixels, got {resolution}")
    if resolution > splits.image_size:
        raise RobustTransferError(f"resolution {resolution} px is above the images' own {splits.image_size} px: "
                                  "it can only take detail away")
    return dataclasses.replace(splits, **{name: degrade(getattr(splits, name), resolution)
                                          for name in ("train", "val", "test")})


def degrade(split: Dataset, resolution: int) -> Dataset:
    """One split at ``resolution`` px, back at its own size (lazily decoded splits item by item, identically)."""
    if not isinstance(split, InMemoryDataset):
        return PerItem(split, functools.partial(degrade, resolution=resolution))
    if not len(split):
        return split
    side = split.images.shape[-1]
    return split.resized(resolution).resized(side) if resolution != side else split
