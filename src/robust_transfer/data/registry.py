"""The dataset registry: one name per dataset, `load_dataset` to get its splits."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from ..errors import RobustTransferError
from .cifar import load_cifar
from .folder import load_image_folder
from .memory import InMemoryDataset
from .sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ROOT,
    load_animal_mnist,
    load_digits,
    load_idx_folder,
    load_mnist_5k,
)
from .splits import DatasetSplits, stratified_split

DATA_HOME = Path(os.environ.get("ROBUST_TRANSFER_DATA", Path.home() / ".cache" / "robust-transfer" / "data"))
TEST_FRACTION = 0.2  # for sets that come without a test split

DEFAULT_FOLDER_SIZE = 224  # image side for sets stored as image files, unless image_size says otherwise


@dataclass(frozen=True)
class LoadRequest:
    """What a loader is asked for: the folder (None = its default place), image side and channels."""

    root: Path | None
    image_size: int | None
    in_channels: int | None


@dataclass(frozen=True)
class DatasetEntry:
    """A registry entry: ``load(request) -> (train, val or None, test or None)`` and how to score it.

    ``metric`` is ``"top1"`` or ``"mean_per_class"`` (the paper's choice for Aircraft, Pets,
    Caltech-101/256 and Flowers).
    """

    load: Callable[[LoadRequest], tuple]
    default_augment: str
    metric: str = "top1"


def register_dataset(name: str, entry: DatasetEntry) -> None:
    """Add a dataset to the registry (used by the loader modules and by plug-ins)."""
    _REGISTRY[name] = entry


def _require(root: Path | None, name: str, layout: str) -> Path:
    if root is None:
        raise RobustTransferError(
            f"dataset {name!r} needs its folder: pass root= (--data-root) holding {layout}")
    return root


def _fashion(request: LoadRequest) -> tuple:
    hint = ("install it with: apt-get install dataset-fashion-mnist, or pass --data-root to a folder "
            "with the four IDX files")
    train, test = load_idx_folder(request.root or FASHION_MNIST_ROOT, FASHION_MNIST_CLASSES, hint)
    return train, None, test


def _idx(request: LoadRequest) -> tuple:
    folder = _require(request.root, "idx", "train-images-idx3-ubyte[.gz] and the other three IDX files")
    hint = "point --data-root at a folder with the four MNIST-style IDX files"
    train, test = load_idx_folder(folder, None, hint)
    return train, None, test


def _cifar(name: str, request: LoadRequest) -> tuple:
    train, test = load_cifar(name, request.root or DATA_HOME)
    return train, None, test


def _image_folder(request: LoadRequest) -> tuple:
    folder = _require(request.root, "imagefolder", "train/<class>/<images> and val/ or test/")
    return load_image_folder(folder, request.image_size or DEFAULT_FOLDER_SIZE, request.in_channels or 3)


_REGISTRY: dict[str, DatasetEntry] = {
    "fashion-mnist": DatasetEntry(_fashion, "crop-flip"),
    "animal-mnist": DatasetEntry(lambda request: (load_animal_mnist(request.root), None, None), "crop-flip"),
    "mnist-5k": DatasetEntry(lambda request: (load_mnist_5k(), None, None), "crop"),
    "digits": DatasetEntry(lambda request: (load_digits(), None, None), "none"),
    "cifar10": DatasetEntry(functools.partial(_cifar, "cifar10"), "crop-flip"),
    "cifar100": DatasetEntry(functools.partial(_cifar, "cifar100"), "crop-flip"),
    "idx": DatasetEntry(_idx, "crop"),
    "imagefolder": DatasetEntry(_image_folder, "crop-flip"),
}


def list_datasets() -> list[str]:
    """Names accepted by `load_dataset`."""
    return list(_REGISTRY)


def _subset(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    if isinstance(dataset, InMemoryDataset):
        return dataset.subset(indices)
    subset = Subset(dataset, indices.tolist())
    subset.labels = dataset.labels[indices]
    subset.class_names = dataset.class_names
    return subset


def first_examples(dataset: Dataset, count: int | None) -> Dataset:
    """The first ``count`` examples of a split (all of it when ``count`` is None or larger)."""
    if count is None or count >= len(dataset):
        return dataset
    return _subset(dataset, torch.arange(count))


_LAZY_STATS: dict[tuple, tuple[tuple[float, ...], tuple[float, ...]]] = {}
STATS_SAMPLE = 512  # images decoded to estimate mean/std of a split too big for memory


def _stats(dataset: Dataset, channels: int, key: tuple) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of the train split: exact in memory, from an even sample otherwise (memoised)."""
    if isinstance(dataset, InMemoryDataset):
        return dataset.channel_stats()
    if key not in _LAZY_STATS:
        step = max(1, len(dataset) // STATS_SAMPLE)
        sample = torch.stack([dataset[i][0] for i in range(0, len(dataset), step)])
        flat = sample.transpose(0, 1).reshape(channels, -1).double()
        _LAZY_STATS[key] = tuple(flat.mean(1).tolist()), tuple(flat.std(1).clamp_min(1e-3).tolist())
    return _LAZY_STATS[key]


def _adapt(split: Dataset, image_size: int | None, in_channels: int | None, name: str) -> Dataset:
    """Resize / convert an in-memory split; check that any other split already has what was asked."""
    if isinstance(split, InMemoryDataset):
        if image_size is not None:
            split = split.resized(image_size)
        if in_channels is not None:
            split = split.with_channels(in_channels)
        return split
    shape = tuple(split[0][0].shape)
    if (in_channels is not None and shape[0] != in_channels) or (image_size is not None and shape[1:] != (
            image_size, image_size)):
        raise RobustTransferError(
            f"dataset {name!r} decodes to {shape[0]}x{shape[1]}x{shape[2]} images although "
            f"in_channels={in_channels} and image_size={image_size} were asked for: "
            "its loader must honour them")
    return split


def load_dataset(name: str, root: str | os.PathLike | None = None, *, val_fraction: float = 0.1,
                 seed: int = 0, image_size: int | None = None,
                 in_channels: int | None = None) -> DatasetSplits:
    """Load ``name`` (see `list_datasets`) and return seeded, stratified train/val/test splits.

    Where the data has an official test split it is kept; validation is a ``val_fraction``
    share of train (unless the data has a validation split of its own). Sets without a test
    split give 20% of every class to test first. ``image_size`` resizes (square) and
    ``in_channels`` converts gray to colour or back. Images stay unnormalised in [0, 1].
    """
    if name not in _REGISTRY:
        raise RobustTransferError(f"unknown dataset {name!r}; choose one of: {', '.join(_REGISTRY)}")
    if not 0 < val_fraction < 1:
        raise RobustTransferError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if in_channels not in (None, 1, 3):
        raise RobustTransferError(f"in_channels must be 1 (gray) or 3 (colour), got {in_channels}")
    if image_size is not None and image_size < 1:
        raise RobustTransferError(f"image_size must be a positive number of pixels, got {image_size}")
    entry = _REGISTRY[name]
    folder = Path(root).expanduser() if root is not None else None
    train, val, test = entry.load(LoadRequest(folder, image_size, in_channels))
    if test is None:
        kept, held = stratified_split(train.labels, TEST_FRACTION, seed)
        train, test = _subset(train, kept), _subset(train, held)
    if val is None:
        kept, held = stratified_split(train.labels, val_fraction, seed + 1)
        train, val = _subset(train, kept), _subset(train, held)
    train, val, test = (_adapt(split, image_size, in_channels, name) for split in (train, val, test))
    sample = train[0][0]
    key = (name, str(folder), val_fraction, seed, image_size, in_channels, len(train))
    mean, std = _stats(train, sample.shape[0], key)
    return DatasetSplits(
        name=name, train=train, val=val, test=test, num_classes=len(train.class_names),
        in_channels=sample.shape[0], image_size=sample.shape[-1], mean=mean, std=std,
        class_names=list(train.class_names), default_augment=entry.default_augment, metric=entry.metric)
