"""Mini-batches whose order and augmentation depend only on (seed, epoch, batch index).

That makes an epoch reproducible after a crash (resume needs no loader state) and makes each
process of a data-parallel run see exactly its share of the batch a single process would see:

- order: ``torch.randperm(N, generator=Generator().manual_seed(seed * 1_000_003 + epoch))`` when
  shuffling, else 0..N-1; global batches are consecutive ``batch_size`` slices of it;
- sharding: rank r of w gets rows r, r + w, r + 2w, ... of every global batch;
- augmentation: drawn for the whole global batch from a generator seeded with (seed, epoch,
  batch index), after which each rank keeps its rows; or, for image files trained with the paper's
  RandomResizedCrop ("resized-crop-flip"), drawn per image from the original file in the loader's
  workers with a seed of (seed, epoch, batch index, row) (see `streaming`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import RobustTransferError
from .augment import AUGMENTATIONS, apply_augmentation, augment_batch, draw_augmentation
from .folder import ImageFiles
from .memory import InMemoryDataset
from .streaming import item_seed

STREAMED_AUGMENT = "resized-crop-flip"  # drawn from the original files, per image, for `ImageFiles` splits

__all__ = ["AUGMENTATIONS", "Batches", "augment_batch", "batch_generator", "epoch_order", "make_batches"]


def epoch_order(size: int, shuffle: bool, seed: int, epoch: int) -> torch.Tensor:
    """The order in which one epoch visits the examples (a seeded permutation, or 0..size-1)."""
    if not shuffle:
        return torch.arange(size)
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator that draws the augmentation of global batch ``index`` of ``epoch``."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 100_003 + index)


def _own_seed() -> torch.Generator:
    """A loader's generator: it draws its workers' base seed from this, not from the training run's stream."""
    return torch.Generator().manual_seed(0)


class Batches:
    """An iterable of (images float32 NCHW in [0, 1], labels int64) for one epoch, with a length.

    ``len()`` is the number of global batches; every rank yields that many (a rank's share of a
    last partial batch may be empty).
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int, epoch: int, augment: str,
                 rank: int, world_size: int, drop_last: bool, num_workers: int,
                 device: torch.device | None = None, decode_device: torch.device | None = None) -> None:
        if augment not in AUGMENTATIONS:
            choices = ", ".join(AUGMENTATIONS)
            raise RobustTransferError(f"unknown augmentation {augment!r}: use one of {choices}")
        if batch_size < 1:
            raise RobustTransferError(f"batch size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.dataset, self.batch_size, self.augment = dataset, batch_size, augment
        self.seed, self.epoch, self.rank, self.world_size = seed, epoch, rank, world_size
        self.num_workers, self.device, self.decode_device = num_workers, device, decode_device
        order = epoch_order(len(dataset), shuffle, seed, epoch)
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        self.global_batches = [order[i:i + batch_size] for i in range(0, stop, batch_size)]

    def __len__(self) -> int:
        return len(self.global_batches)

    @property
    def crops_from_files(self) -> bool:
        """Whether the images are cropped from their original files in the loader (see the module docstring)."""
        return self.augment == STREAMED_AUGMENT and isinstance(self.dataset, ImageFiles)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.crops_from_files:
            return self._from_stream()
        if isinstance(self.dataset, InMemoryDataset):
            return self._from_memory()
        return self._from_loader()

    def _share(self, members: torch.Tensor) -> torch.Tensor:
        return members[self.rank::self.world_size]

    def _augment_share(self, x: torch.Tensor, index: int, global_size: int) -> torch.Tensor:
        """Draw the augmentation for the whole global batch, then apply this rank's rows of it to ``x``."""
        if self.augment == "none":
            return x.contiguous()
        params = draw_augmentation(self.augment, global_size, x.shape[-2], x.shape[-1],
                                   batch_generator(self.seed, self.epoch, index))
        return apply_augmentation(x, params.rows(slice(self.rank, None, self.world_size))).contiguous()

    def _from_memory(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # uint8 tensors in memory: index them directly, convert only this rank's rows.
        for index, members in enumerate(self.global_batches):
            share = self._share(members)
            x = self.dataset.images[share].float().div_(255)
            yield self._augment_share(x, index, len(members)), self.dataset.labels[share]

    def _from_loader(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Workers decode only this rank's rows; empty shares (a short last batch) are not sent to them.
        shares = [self._share(members).tolist() for members in self.global_batches]
        loader = iter(DataLoader(self.dataset, batch_sampler=[s for s in shares if s],
                                 num_workers=self.num_workers, generator=_own_seed()))
        empty: tuple[torch.Tensor, torch.Tensor] | None = None
        for index, (members, share) in enumerate(zip(self.global_batches, shares, strict=True)):
            if not share:
                if empty is None:
                    shape = tuple(self.dataset[int(members[0])][0].shape)
                    empty = torch.empty((0, *shape)), torch.empty(0, dtype=torch.long)
                yield empty
                continue
            x, y = next(loader)
            yield self._augment_share(x.float(), index, len(members)), torch.as_tensor(y).long()

    def _from_stream(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Workers decode and crop this rank's rows, keyed by their place in the global batch; uint8 crosses to the
        # main process (pinned for a GPU) and becomes float only where the batch will be used. The keys are made
        # batch by batch as the loader asks (an ImageNet epoch's would be 1.3M tuples held at once).
        streamed = self.dataset.streamed(self.decode_device)
        rows = [range(self.rank, len(members), self.world_size) for members in self.global_batches]
        keys = ([(int(members[row]), item_seed(self.seed, self.epoch, index, row)) for row in mine]
                for index, (members, mine) in enumerate(zip(self.global_batches, rows, strict=True)) if mine)
        cuda = self.device is not None and self.device.type == "cuda"
        encoded = self.decode_device is not None  # the workers read bytes; the batch is decoded here, on the device
        loader = iter(DataLoader(streamed, batch_sampler=keys, num_workers=self.num_workers,
                                 pin_memory=cuda and not encoded, collate_fn=list if encoded else None,
                                 generator=_own_seed()))
        empty = (torch.empty((0, streamed.channels, streamed.size, streamed.size)), torch.empty(0, dtype=torch.long))
        for mine in rows:
            if not mine:
                yield empty
                continue
            if encoded:
                x, y = streamed.decode_batch(next(loader))
            else:
                x, y = next(loader)
            if cuda:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield x.float().div_(255), y.long()


def make_batches(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
                 augment: str = "none", rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 num_workers: int = 0, device: torch.device | None = None,
                 decode_device: torch.device | None = None) -> Batches:
    """Batches of ``dataset`` for one epoch; see the module docstring for the guarantees.

    Rank ``r`` of ``world_size`` gets rows r, r + world_size, ... of every global batch, with
    the augmentation those rows get in a single-process run. Datasets holding a uint8
    ``images`` tensor (`InMemoryDataset`) are indexed directly; others go through a
    DataLoader with ``num_workers`` workers, as do image files (`ImageFiles`) under "resized-crop-flip",
    cropped from their originals. ``device``: where the batches go; a CUDA device gets streamed batches
    through pinned memory, copied without blocking and turned to float there. ``decode_device``: decode streamed
    JPEGs there (nvJPEG on a CUDA device), the workers only reading the files.
    """
    return Batches(dataset, batch_size, shuffle, seed, epoch, augment, rank, world_size, drop_last,
                   num_workers, device, decode_device)
