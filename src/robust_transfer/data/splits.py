"""Train / validation / test splits: seeded, stratified, deterministic."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset


@dataclass
class DatasetSplits:
    """A dataset's three splits and what a model needs to know about its images.

    ``mean`` / ``std`` are per-channel statistics of the train split in [0, 1] units (for the
    model's normalisation layer; the data itself stays unnormalised).
    """

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    default_augment: str
    metric: str = "top1"  # or "mean_per_class"


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (kept, held_out) with ``fraction`` of every class held out.

    Each class with at least two examples keeps at least one and gives at least one.
    """
    generator = torch.Generator().manual_seed(seed)
    kept, held = [], []
    values = labels.cpu().numpy()  # numpy: torch.unique/nonzero cost ~0.3 s on 60k labels here
    for label in np.unique(values):
        members = torch.from_numpy(np.flatnonzero(values == label))
        members = members[torch.randperm(len(members), generator=generator)]
        count = round(fraction * len(members))
        if len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        held.append(members[:count])
        kept.append(members[count:])
    def ordered(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.from_numpy(np.sort(torch.cat(parts).numpy()))

    return ordered(kept), ordered(held)
