"""Training images streamed from their files: decoded and augmented in DataLoader workers, item by item.

This is the paper's (and torchvision's ImageNet) training transform, RandomResizedCrop + horizontal flip drawn from
the whole original photograph, for image-file sets of any size. Each item is keyed by its index *and* a seed, and
the crop and flip are drawn by torchvision.transforms.v2 from that seed alone, so an item's pixels do not depend on
which worker decodes it, how many workers or processes there are, or what ran before: `batches` derives the seed
from (seed, epoch, global batch, row), and a resumed epoch or a data-parallel rank gets the crops one process would.
Items come out as uint8 (a quarter of float32 through the workers' shared memory and the copy to a GPU).

With a ``decode_device`` (a CUDA device: nvJPEG through TorchCodec) the workers only read the files' bytes and
`decode_batch` decodes and crops a whole batch on that device; the crop and flip are drawn from the same seeds,
after decoding, so they are the same boxes whichever decoder ran.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .decode import DECODE_ERRORS, cannot_decode, decode_jpegs, read_bytes, read_original

CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop defaults, the paper's training transform
CROP_RATIO = (3 / 4, 4 / 3)
RESUME_ADVICE = "remove or replace the file, then --resume"


def item_seed(seed: int, epoch: int, batch: int, row: int) -> int:
    """The seed of the crop and flip of row ``row`` of global batch ``batch`` of ``epoch`` (fits in 63 bits)."""
    return ((((seed * 1_000_003 + epoch) * 100_003 + batch) * 65_537 + row) * 0x9E3779B1) % (2**63 - 1)


class StreamedCrops(Dataset):
    """A split's image files; item ``(index, seed)`` is ``(uint8 [C, size, size], label)``: a RandomResizedCrop
    (scale 0.08-1, aspect 3/4-4/3, bilinear with antialiasing) of the original image, flipped with p = 0.5, both
    drawn from ``seed`` alone."""

    def __init__(self, paths: list[Path], labels: torch.Tensor, class_names: list[str], size: int,
                 channels: int, decode_device: torch.device | None = None) -> None:
        # One bytes array, not a list of Path objects: loader workers reading a Python list touch every object's
        # reference count and so copy the pages it lives on, each worker its own copy of ImageNet's 1.3M paths.
        self._paths = np.array([os.fsencode(path) for path in paths], dtype=np.bytes_)
        self.labels, self.class_names = labels, list(class_names)
        self.size, self.channels, self.decode_device = size, channels, decode_device
        self._crop = v2.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO, antialias=True)

    def __len__(self) -> int:
        return len(self._paths)

    def path(self, index: int) -> Path:
        """The file of item ``index``."""
        return Path(os.fsdecode(self._paths[index]))

    def crop_box(self, seed: int, height: int, width: int) -> tuple[dict[str, int], bool]:
        """The crop (top, left, height, width in pixels of a ``height`` x ``width`` original) and flip of ``seed``.

        Drawn by torchvision's own RandomResizedCrop (up to 10 tries inside the image, else the central crop
        clipped to the aspect range) from the global generator, seeded for the draw and restored after it, so the
        caller's random stream (a training run's, with 0 workers) is untouched."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            box = self._crop.make_params([torch.empty(1, 1, 1, dtype=torch.uint8).expand(self.channels, height, width)])
            flip = bool(torch.rand(()) < 0.5)
        return box, flip

    def crop(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """The crop and flip of ``seed`` of an original ``image`` [C, H, W], resized to ``size`` (on its device)."""
        box, flip = self.crop_box(seed, image.shape[-2], image.shape[-1])
        out = v2.functional.resized_crop(image, **box, size=[self.size, self.size], antialias=True)
        return v2.functional.horizontal_flip(out) if flip else out

    def _original(self, index: int) -> torch.Tensor:
        try:
            return read_original(self.path(index), self.channels)
        except DECODE_ERRORS as error:
            raise cannot_decode(self.path(index), error, RESUME_ADVICE) from None

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        index, seed = key
        if self.decode_device is not None:  # the main process decodes: send the file's bytes
            try:
                return index, seed, read_bytes(self.path(index))
            except OSError as error:
                raise cannot_decode(self.path(index), error, RESUME_ADVICE) from None
        return self.crop(self._original(index), seed), int(self.labels[index])

    def decode_batch(self, items: list[tuple[int, int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of ``(index, seed, bytes)`` items (with a ``decode_device``) decoded together there, cropped and
        stacked: (uint8 [N, C, size, size], labels), both on ``decode_device``."""
        try:
            images = decode_jpegs([data for _, _, data in items], self.channels, self.decode_device)
        except RuntimeError:  # one file is not a JPEG the decoder takes: decode one by one, PIL where needed
            images = []
            for index, _, data in items:
                try:
                    images.append(decode_jpegs([data], self.channels, self.decode_device)[0])
                except RuntimeError:
                    images.append(self._original(index).to(self.decode_device))
        crops = [self.crop(image, seed) for image, (_, seed, _) in zip(images, items, strict=True)]
        labels = self.labels[[index for index, _, _ in items]]
        return torch.stack(crops), labels.to(self.decode_device)
