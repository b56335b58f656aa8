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
from .augment import center_crop, eval_resize_size
from .cifar import load_cifar
from .folder import ImageFiles, TrainFiles, load_image_folder
from .imagenet import LAYOUT as IMAGENET_LAYOUT
from .imagenet import load_imagenet
from .memory import InMemoryDataset, PerItem
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
    Caltech-101/256 and Flowers). ``decodes_at_size``: the loader decodes image files at the
    asked size (shorter side resized, centre-cropped square), so validation and test always get
    the paper's test transform (already decoded so by `load_split` with ``held_out``, or applied
    by `eval_transform`); False for sets held in memory at a native size, which `load_dataset`
    resizes and which get that transform only when resized.
    """

    load: Callable[[LoadRequest], tuple]
    default_augment: str
    metric: str = "top1"
    decodes_at_size: bool = True


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


def _imagenet(request: LoadRequest) -> tuple:
    folder = _require(request.root, "imagenet", IMAGENET_LAYOUT)
    return load_imagenet(folder, request.image_size or DEFAULT_FOLDER_SIZE, request.in_channels or 3)


_NATIVE = {"decodes_at_size": False}  # held in memory at their own size
_REGISTRY: dict[str, DatasetEntry] = {
    "fashion-mnist": DatasetEntry(_fashion, "crop-flip", **_NATIVE),
    "animal-mnist": DatasetEntry(lambda request: (load_animal_mnist(request.root), None, None), "crop-flip",
                                 **_NATIVE),
    "mnist-5k": DatasetEntry(lambda request: (load_mnist_5k(), None, None), "crop", **_NATIVE),
    "digits": DatasetEntry(lambda request: (load_digits(), None, None), "none", **_NATIVE),
    "cifar10": DatasetEntry(functools.partial(_cifar, "cifar10"), "crop-flip", **_NATIVE),
    "cifar100": DatasetEntry(functools.partial(_cifar, "cifar100"), "crop-flip", **_NATIVE),
    "idx": DatasetEntry(_idx, "crop", **_NATIVE),
    "imagefolder": DatasetEntry(_image_folder, "crop-flip"),
    "imagenet": DatasetEntry(_imagenet, "resized-crop-flip"),  # streamed from the files: the paper's training crops
}


def list_datasets() -> list[str]:
    """Names accepted by `load_dataset`."""
    return list(_REGISTRY)


def _subset(dataset: Dataset, indices: torch.Tensor) -> Dataset:
    if isinstance(dataset, (InMemoryDataset, ImageFiles)):
        return dataset.subset(indices)
    subset = Subset(dataset, indices.tolist())
    subset.labels = dataset.labels[indices]
    subset.class_names = dataset.class_names
    return subset


def sample_examples(dataset: Dataset, count: int | None, seed: int = 0) -> Dataset:
    """A seeded random ``count`` examples of a split, in their stored order (all when ``count`` is None or larger).

    Random rather than the first ``count``: several datasets store their examples class by class, so
    the first few hundred would hold one or two classes.
    """
    if count is None or count >= len(dataset):
        return dataset
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
    return _subset(dataset, chosen.sort().values)


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


def eval_transform(split: Dataset, size: int) -> Dataset:
    """The paper's test transform on square images: resized to `eval_resize_size` (``size`` * 256 / 224), then
    the central ``size`` x ``size`` kept. Lazily decoded splits are transformed item by item, identically."""
    if not isinstance(split, InMemoryDataset):
        return PerItem(split, functools.partial(eval_transform, size=size))
    if not len(split):  # nothing to resize (a split left empty by a small class), only its shape to set
        return InMemoryDataset(split.images.new_empty((0, split.images.shape[1], size, size)), split.labels,
                               split.class_names)
    # Images decoded at ``size`` are resampled up by 256/224 here: the paper's geometry exactly, slightly softer
    # pixels than decoding the file at the larger side (as `load_split` does for the folder loaders' held-out splits).
    resized = split.resized(eval_resize_size(size))
    return InMemoryDataset(center_crop(resized.images, size), split.labels, split.class_names)


def _held_out_share(train: Dataset, indices: torch.Tensor) -> Dataset:
    """Examples held out of train for validation or test; a split decoded from files decodes them again with the
    test transform, straight from the files (not resampled from the train decode)."""
    decode = getattr(train, "decode_held_out", None)
    return decode(indices) if decode is not None else _subset(train, indices)


def _adapt(split: Dataset, image_size: int | None, in_channels: int | None, name: str, held_out: bool,
           decodes_at_size: bool) -> Dataset:
    """Resize / convert an in-memory split, the paper's test transform for held-out splits (validation, test)
    decoded from files or resized; check that any other split already has what was asked."""
    held_out = held_out and not getattr(split, "held_out", False)  # not twice: decoded with it from its files
    if isinstance(split, InMemoryDataset):
        side = split.images.shape[-1]
        resize = image_size is not None and tuple(split.images.shape[-2:]) != (image_size, image_size)
        if held_out and (decodes_at_size or resize):
            split = eval_transform(split, image_size or side)
        elif resize:
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
    return eval_transform(split, shape[-1]) if held_out and decodes_at_size else split


def load_dataset(name: str, root: str | os.PathLike | None = None, *, val_fraction: float = 0.1,
                 seed: int = 0, image_size: int | None = None,
                 in_channels: int | None = None) -> DatasetSplits:
    """Load ``name`` (see `list_datasets`) and return seeded, stratified train/val/test splits.

    Where the data has an official test split it is kept; validation is a ``val_fraction``
    share of train (unless the data has a validation split of its own). Sets without a test
    split give 20% of every class to test first. ``image_size`` resizes (square) and
    ``in_channels`` converts gray to colour or back. Images stay unnormalised in [0, 1].

    Validation and test get the paper's test transform (Resize(256) + CenterCrop(224) at 224 px,
    scaled to ``image_size``: see `eval_transform`) for sets decoded from image files and for
    in-memory sets resized to another size; an in-memory set at its native size is left as it is.
    Train images are the whole centre square at ``image_size`` (the random crops come from
    ``default_augment``).
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
        train, test = _subset(train, kept), _held_out_share(train, held)
    if val is None:
        kept, held = stratified_split(train.labels, val_fraction, seed + 1)
        train, val = _subset(train, kept), _held_out_share(train, held)
    if isinstance(train, TrainFiles):  # decoded only now: the held-out shares above were decoded the held-out way
        train = train.decode()
    train, val, test = (_adapt(split, image_size, in_channels, name, held_out, entry.decodes_at_size)
                        for split, held_out in ((train, False), (val, True), (test, True)))
    sample = train[0][0]
    key = (name, str(folder), val_fraction, seed, image_size, in_channels, len(train))
    mean, std = _stats(train, sample.shape[0], key)
    return DatasetSplits(
        name=name, train=train, val=val, test=test, num_classes=len(train.class_names),
        in_channels=sample.shape[0], image_size=sample.shape[-1], mean=mean, std=std,
        class_names=list(train.class_names), default_augment=entry.default_augment, metric=entry.metric)
