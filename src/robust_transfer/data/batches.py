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

AUGMENTATIONS = ("none", "crop", "crop-flip")


def epoch_order(size: int, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    if not shuffle:
        return torch.arange(size)
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def augment_batch(x: torch.Tensor, augment: str, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding of side // 8 pixels, plus a horizontal flip for crop-flip."""
    if augment == "none" or len(x) == 0:
        return x
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
