"""Mini-batches whose order and augmentation depend only on (seed, epoch, batch index).

That makes an epoch reproducible after a crash (resume needs no loader state) and makes each
process of a data-parallel run see exactly its share of the batch a single process would see.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import RobustTransferError
from .memory import InMemoryDataset

AUGMENTATIONS = ("none", "crop", "crop-flip", "resized-crop-flip")


def epoch_order(size: int, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    if not shuffle:
        return torch.arange(size)
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def random_resized_crop_flip(x: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip (the paper's training transform) on a whole batch at once.

    Each image gets a box of random area (``scale`` of the image) and aspect (``ratio``), resampled
    bilinearly back to the batch's size through one affine grid.
    """
    n = len(x)
    area = torch.empty(n).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n).uniform_(torch.tensor(ratio[0]).log().item(), torch.tensor(ratio[1]).log().item(),
                                        generator=generator)
    aspect = log_ratio.exp()
    width = (area * aspect).sqrt().clamp(max=1.0)   # as fractions of the image side
    height = (area / aspect).sqrt().clamp(max=1.0)
    centre_x = (torch.rand(n, generator=generator) * 2 - 1) * (1 - width)
    centre_y = (torch.rand(n, generator=generator) * 2 - 1) * (1 - height)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border",
                                           align_corners=False).clamp_(0, 1)


def augment_batch(x: torch.Tensor, augment: str, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding of side // 8 pixels, plus a horizontal flip for crop-flip."""
    if augment == "none" or len(x) == 0:
        return x
    if augment == "resized-crop-flip":
        return random_resized_crop_flip(x, generator)
    n, _, height, width = x.shape
    pad = max(1, min(height, width) // 8)
    shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if augment == "crop-flip" else torch.zeros(n, dtype=torch.bool)
    channels = x.shape[1]
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (shifts[:, 0:1] + torch.arange(height)).view(n, 1, height, 1)
    rows = rows.expand(n, channels, height, padded.shape[3])
    cols = shifts[:, 1:2] + torch.arange(width)
    cols = torch.where(flips.view(n, 1), cols.flip(1), cols).view(n, 1, 1, width)
    return padded.gather(2, rows).gather(3, cols.expand(n, channels, height, width))


class Batches:
    """An iterable of (images float32 NCHW in [0, 1], labels int64) with a length."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int, epoch: int, augment: str,
                 rank: int, world_size: int, drop_last: bool, num_workers: int) -> None:
        if augment not in AUGMENTATIONS:
            raise RobustTransferError(f"unknown augmentation {augment!r}: use one of {', '.join(AUGMENTATIONS)}")
        if batch_size < 1:
            raise RobustTransferError(f"batch size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.dataset, self.batch_size, self.augment = dataset, batch_size, augment
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.num_workers = num_workers
        order = epoch_order(len(dataset), shuffle, seed, epoch)
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        self.global_batches = [order[i:i + batch_size] for i in range(0, stop, batch_size)]

    def __len__(self) -> int:
        return len(self.global_batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if isinstance(self.dataset, InMemoryDataset):
            return self._from_memory()
        return self._from_loader()

    def _augmented_share(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Augment the whole global batch with its own generator, then keep this rank's rows."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 100_003 + index)
        return augment_batch(x, self.augment, generator)[self.rank::self.world_size]

    def _from_memory(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index, members in enumerate(self.global_batches):
            x = self.dataset.images[members].float().div_(255)
            y = self.dataset.labels[members]
            yield self._augmented_share(x, index).contiguous(), y[self.rank::self.world_size]

    def _from_loader(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Workers decode the whole global batch only when augmentation needs it; otherwise just our share.
        loader = DataLoader(self.dataset, batch_sampler=[b.tolist() for b in self.global_batches],
                            num_workers=self.num_workers, persistent_workers=False)
        for index, (x, y) in enumerate(loader):
            yield self._augmented_share(x.float(), index).contiguous(), y.long()[self.rank::self.world_size]


def make_batches(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                 augment: str = "none", rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 num_workers: int = 0) -> Batches:
    """Batches of ``dataset`` for one epoch; see the module docstring for the guarantees.

    Rank ``r`` of ``world_size`` gets rows r, r + world_size, ... of every global batch.
    """
    return Batches(dataset, batch_size, shuffle, seed, epoch, augment, rank, world_size, drop_last, num_workers)
