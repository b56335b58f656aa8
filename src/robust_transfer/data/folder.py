"""Image folders: root/train/<class>/*.jpg and root/val/ or root/test/ beside it.

Every image is converted to RGB (or gray), whatever its mode (RGBA, palette, CMYK, 16-bit);
undecodable files are skipped and counted in a warning. Small folders are decoded once into
memory; large ones are decoded item by item; training with the paper's RandomResizedCrop streams crops of the
original files (`streaming`) whatever the size. Validation and test images are decoded with the
paper's test transform straight from the files (see `decode_image`). Each file is decoded once:
train comes back as `TrainFiles`, decoded by `load_dataset` after it has taken out (and decoded
the held-out way) the validation share.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import RobustTransferError
from .decode import DECODE_ERRORS, IMAGE_SUFFIXES, cannot_decode, decode_image
from .memory import InMemoryDataset
from .streaming import StreamedCrops

log = logging.getLogger(__name__)

IN_MEMORY_LIMIT_BYTES = 2 * 2**30


def _class_folders(split_dir: Path) -> dict[str, list[Path]]:
    """Class name -> its image files (by extension; hidden files and folders are ignored)."""
    classes = {}
    folders = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    # ImageNet's 1,000 train folders take a while to list on a network disk: show it (on a terminal only).
    for folder in tqdm(folders, desc=f"scan {split_dir.name}/", unit="class", leave=False,
                       disable=None if len(folders) >= 100 else True):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        classes[folder.name] = files
    return classes


def scan_split(split_dir: Path, class_names: list[str] | None) -> tuple[list[Path], list[int], list[str]]:
    """Files and labels of one split; with ``class_names`` given, a class outside it is an error."""
    classes = _class_folders(split_dir)
    empty = [name for name, files in classes.items() if not files]
    if empty:
        log.warning("%s: skipped %d empty class folder(s): %s", split_dir, len(empty), ", ".join(empty[:5]))
    if class_names is None:
        class_names = [name for name, files in classes.items() if files]
        if len(class_names) < 2:
            raise RobustTransferError(
                f"{split_dir} has {len(class_names)} class folder(s) with images; a classification dataset "
                "needs at least 2 (layout: train/<class>/<image files>)")
    unknown = [name for name, files in classes.items() if files and name not in class_names]
    if unknown:
        raise RobustTransferError(
            f"{split_dir} has class folder(s) that train/ lacks: {', '.join(unknown[:5])}; "
            "every class must have a folder with images under train/")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        for path in classes.get(name, []):
            paths.append(path)
            labels.append(label)
    return paths, labels, class_names


class ImageFiles:
    """What a split decoded from files keeps: its files and how they were decoded. `load_dataset` does not apply
    the test transform again to a ``held_out`` split, and decodes a share of train it holds out afresh; `batches`
    trains on `streamed` crops of the original files when the augmentation is the paper's RandomResizedCrop."""

    paths: list[Path]
    labels: torch.Tensor
    class_names: list[str]
    size: int
    channels: int
    held_out: bool

    def decode_held_out(self, indices: torch.Tensor) -> Dataset:
        """The examples at ``indices`` decoded again from their files, as held-out images."""
        if not len(indices):  # a share too small to hold anything out
            return InMemoryDataset(torch.empty((0, self.channels, self.size, self.size), dtype=torch.uint8),
                                   torch.empty(0, dtype=torch.long), self.class_names)
        return load_split(self._picked(indices), self.labels[indices].tolist(), self.class_names, self.size,
                          self.channels, "held-out share", held_out=True)

    def streamed(self, decode_device: torch.device | None = None) -> StreamedCrops:
        """The same files as RandomResizedCrop + flip training crops of the originals (see `streaming`)."""
        return StreamedCrops(self.paths, self.labels, self.class_names, self.size, self.channels, decode_device)

    def _picked(self, indices: torch.Tensor) -> list[Path]:
        return [self.paths[i] for i in indices.tolist()]


class DecodedImages(ImageFiles, InMemoryDataset):
    """Images decoded from files into memory (see `InMemoryDataset`), with the files they came from."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str], paths: list[Path],
                 size: int, channels: int, held_out: bool) -> None:
        super().__init__(images, labels, class_names)
        self.paths, self.size, self.channels, self.held_out = paths, size, channels, held_out

    def subset(self, indices: torch.Tensor | list[int]) -> DecodedImages:
        """The examples at ``indices``, with their files (so that they can still be streamed)."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return DecodedImages(self.images[indices], self.labels[indices], self.class_names, self._picked(indices),
                             self.size, self.channels, self.held_out)


class FolderDataset(ImageFiles, Dataset):
    """Lazily decoded images (for folders too big for memory); items as float [0, 1] tensors."""

    def __init__(self, paths: list[Path], labels: list[int], class_names: list[str], size: int,
                 channels: int, held_out: bool = False) -> None:
        self.paths, self.class_names = paths, class_names
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.size, self.channels, self.held_out = size, channels, held_out

    @property
    def num_classes(self) -> int:
        """Number of classes (folders under train/ with images)."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            image = decode_image(self.paths[index], self.size, self.channels, self.held_out)
        except DECODE_ERRORS as error:
            raise cannot_decode(self.paths[index], error) from None
        return image.float().div_(255), int(self.labels[index])

    def subset(self, indices: torch.Tensor | list[int]) -> FolderDataset:
        """The files at ``indices``, still decoded item by item."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return FolderDataset(self._picked(indices), self.labels[indices].tolist(), self.class_names, self.size,
                             self.channels, self.held_out)


def join_files(first: ImageFiles, second: ImageFiles) -> ImageFiles:
    """Two splits of one dataset as one (train + validation for a refit), decoded as train is: in memory when
    both are, item by item otherwise; either way still streamable from the files."""
    paths, labels = [*first.paths, *second.paths], torch.cat([first.labels, second.labels])
    if isinstance(first, DecodedImages) and isinstance(second, DecodedImages):
        return DecodedImages(torch.cat([first.images, second.images]), labels, first.class_names, paths, first.size,
                             first.channels, held_out=False)
    return FolderDataset(paths, labels.tolist(), first.class_names, first.size, first.channels)


class TrainFiles(FolderDataset):
    """A train split's files, not yet decoded: `load_dataset` first takes out the share it holds out for
    validation (or test), which `decode_held_out` decodes the held-out way, then `decode`s the rest. Each
    file is decoded once, not once as train and again as held out."""

    def __init__(self, paths: list[Path], labels: list[int], class_names: list[str], size: int,
                 channels: int, description: str) -> None:
        super().__init__(paths, labels, class_names, size, channels)
        self.description = description

    def subset(self, indices: torch.Tensor) -> TrainFiles:
        """The files at ``indices``, still not decoded."""
        return TrainFiles(self._picked(indices), self.labels[indices].tolist(), self.class_names, self.size,
                          self.channels, self.description)

    def decode(self) -> Dataset:
        """The images, decoded as `load_split` decodes a train split."""
        return load_split(self.paths, self.labels.tolist(), self.class_names, self.size, self.channels,
                          self.description)


def load_split(paths: list[Path], labels: list[int], class_names: list[str], size: int, channels: int,
               description: str, held_out: bool = False) -> Dataset:
    """Decode a split into memory when it fits, skipping (and counting) files that do not decode; ``held_out``
    (validation, test) decodes with the paper's test transform (see `decode_image`)."""
    if len(paths) * channels * size * size > IN_MEMORY_LIMIT_BYTES:
        return FolderDataset(paths, labels, class_names, size, channels, held_out)
    images = torch.empty((len(paths), channels, size, size), dtype=torch.uint8)  # filled in place: no 2x peak
    kept, kept_paths, bad = [], [], []
    progress = tqdm(paths, desc=f"decode {description}", unit="img", leave=False,
                    disable=None if len(paths) >= 500 else True)  # None: only on a terminal
    for index, path in enumerate(progress):
        try:
            images[len(kept)] = decode_image(path, size, channels, held_out)
            kept.append(labels[index])
            kept_paths.append(path)
        except DECODE_ERRORS as error:
            bad.append(f"{path.name} ({type(error).__name__})")
    if bad:
        log.warning("%s: skipped %d file(s) that do not decode: %s%s", description, len(bad),
                    ", ".join(bad[:3]), " ..." if len(bad) > 3 else "")
    if not kept:
        raise RobustTransferError(f"{description}: none of its {len(paths)} image file(s) decodes; "
                                  "check that they are images (jpg, png, ...)")
    images = images[:len(kept)].clone() if bad else images
    return DecodedImages(images, torch.tensor(kept, dtype=torch.long), class_names, kept_paths, size, channels,
                         held_out)


def load_image_folder(root: Path, size: int, channels: int) -> tuple[TrainFiles, Dataset | None, Dataset]:
    """(train files, val or None, test) of an image-folder dataset at ``root``; train is decoded by `load_dataset`."""
    layout = "root/train/<class>/<images> plus root/val/<class>/... and/or root/test/<class>/..."
    if not (root / "train").is_dir():
        found = sorted(p.name for p in root.iterdir())[:8] if root.is_dir() else "the folder does not exist"
        raise RobustTransferError(f"{root} is not an image folder dataset: expected {layout}; "
                                  f"found {found}")
    held_out = [name for name in ("val", "test") if (root / name).is_dir()]
    if not held_out:
        raise RobustTransferError(f"{root} has train/ but neither val/ nor test/: expected {layout}")
    paths, labels, class_names = scan_split(root / "train", None)
    train = TrainFiles(paths, labels, class_names, size, channels, f"{root.name}/train")  # decoded by load_dataset
    splits = {}
    for name in held_out:
        split_paths, split_labels, _ = scan_split(root / name, class_names)
        if not split_paths:
            raise RobustTransferError(f"{root / name} holds no image files: expected {layout}")
        splits[name] = load_split(split_paths, split_labels, class_names, size, channels,
                                  f"{root.name}/{name}", held_out=True)
    if len(held_out) == 2:
        return train, splits["val"], splits["test"]
    return train, None, splits[held_out[0]]
