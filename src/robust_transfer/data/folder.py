"""Image folders: root/train/<class>/*.jpg and root/val/ or root/test/ beside it.

Every image is converted to RGB (or gray), whatever its mode (RGBA, palette, CMYK, 16-bit);
undecodable files are skipped and counted in a warning. Small folders are decoded once into
memory; large ones are decoded item by item.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import RobustTransferError
from .memory import InMemoryDataset

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
IN_MEMORY_LIMIT_BYTES = 2 * 2**30


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit gray: scale to 8 bits rather than clip everything above 255 to white.
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255, 0, 255).astype(np.uint8), mode="L")
    elif image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("L" if channels == 1 else "RGB")


def decode_image(path: Path, size: int, channels: int) -> torch.Tensor:
    """A uint8 [C, size, size] tensor: shorter side resized to ``size``, then centre-cropped."""
    with Image.open(path) as image:
        image.load()
        image = _to_mode(image, channels)
        image = ImageOps.fit(image, (size, size), method=Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _class_folders(split_dir: Path) -> dict[str, list[Path]]:
    classes = {}
    for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
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
            f"{split_dir} has class folder(s) that train/ lacks: {', '.join(unknown[:5])}")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        for path in classes.get(name, []):
            paths.append(path)
            labels.append(label)
    return paths, labels, class_names


class FolderDataset(Dataset):
    """Lazily decoded images (for folders too big for memory); items as float [0, 1] tensors."""

    def __init__(self, paths: list[Path], labels: list[int], class_names: list[str], size: int,
                 channels: int) -> None:
        self.paths, self.labels, self.class_names = paths, torch.tensor(labels, dtype=torch.long), class_names
        self.size, self.channels = size, channels

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            image = decode_image(self.paths[index], self.size, self.channels)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise RobustTransferError(f"cannot decode {self.paths[index]}: {error}") from None
        return image.float().div_(255), int(self.labels[index])


def load_split(paths: list[Path], labels: list[int], class_names: list[str], size: int, channels: int,
               description: str) -> Dataset:
    """Decode a split into memory when it fits, skipping (and counting) files that do not decode."""
    if len(paths) * channels * size * size > IN_MEMORY_LIMIT_BYTES:
        return FolderDataset(paths, labels, class_names, size, channels)
    images, kept, bad = [], [], []
    for path, label in tqdm(list(zip(paths, labels, strict=True)), desc=f"decode {description}", unit="img",
                            leave=False, disable=len(paths) < 500):
        try:
            images.append(decode_image(path, size, channels))
            kept.append(label)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
            bad.append(f"{path.name} ({type(error).__name__})")
    if bad:
        log.warning("%s: skipped %d file(s) that do not decode: %s%s", description, len(bad), ", ".join(bad[:3]),
                    " ..." if len(bad) > 3 else "")
    if not images:
        raise RobustTransferError(f"{description}: no decodable image among {len(paths)} file(s)")
    return InMemoryDataset(torch.stack(images), torch.tensor(kept, dtype=torch.long), class_names)


def load_image_folder(root: Path, size: int, channels: int) -> tuple[Dataset, Dataset | None, Dataset]:
    """(train, val or None, test) of an image-folder dataset at ``root``."""
    layout = "root/train/<class>/<images> plus root/val/<class>/... and/or root/test/<class>/..."
    if not (root / "train").is_dir():
        found = sorted(p.name for p in root.iterdir())[:8] if root.is_dir() else "the folder does not exist"
        raise RobustTransferError(f"{root} is not an image folder dataset: expected {layout}; found {found}")
    held_out = [name for name in ("val", "test") if (root / name).is_dir()]
    if not held_out:
        raise RobustTransferError(f"{root} has train/ but neither val/ nor test/: expected {layout}")
    paths, labels, class_names = scan_split(root / "train", None)
    train = load_split(paths, labels, class_names, size, channels, f"{root.name}/train")
    splits = {}
    for name in held_out:
        split_paths, split_labels, _ = scan_split(root / name, class_names)
        splits[name] = load_split(split_paths, split_labels, class_names, size, channels, f"{root.name}/{name}")
    if len(held_out) == 2:
        return train, splits["val"], splits["test"]
    return train, None, splits[held_out[0]]
