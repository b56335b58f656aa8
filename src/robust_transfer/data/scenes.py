"""The embedded detection target: scenes cut from real photographs with Fashion-MNIST objects pasted in.

Backgrounds are crops of the photographs installed packages ship (scikit-learn's ``china.jpg`` and
``flower.jpg``, matplotlib's ``grace_hopper.jpg``); each scene gets one to three objects of a few
Fashion-MNIST classes, scaled, tinted and pasted where they do not overlap, so every box and mask is
exact: the mask is the object's own pixels, the box is the mask's extent. Train scenes take objects from
Fashion-MNIST's training images, validation and test scenes from its test images.

The scenes are written once, in the COCO-format folder layout (``train/``, ``val/``, ``test/``, each with
``annotations.json`` and PNG images, masks as RLE), under the cache, and reused; they are what
``robust-transfer detect SOURCE --data scenes`` trains on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib
import numpy as np
import sklearn.datasets
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as coco_mask

from ..errors import RobustTransferError
from .registry import load_dataset

SCENES_NAME = "scenes"
DEFAULT_ROOT = Path.home() / ".cache" / "robust-transfer" / "scenes"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


@dataclass(frozen=True)
class SceneRecipe:
    """How many scenes of which size, with which Fashion-MNIST classes (by label), objects per scene and scale."""

    train: int = 320
    val: int = 48
    test: int = 96
    size: int = 96
    classes: tuple[int, ...] = (1, 7, 8)        # Trouser, Sneaker, Bag: three clearly different shapes
    objects: tuple[int, int] = (1, 3)
    scale: tuple[float, float] = (1.1, 1.9)     # object side = 28 px x scale
    seed: int = 0
    version: int = 1                            # bump when the drawing changes, so caches are redrawn

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def background_photos() -> list[np.ndarray]:
    """The real photographs the scenes are cut from, as H x W x 3 uint8 arrays."""
    images = Path(sklearn.datasets.__file__).parent / "images"
    paths = [images / "china.jpg", images / "flower.jpg",
             Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    found = [p for p in paths if p.exists()]
    if not found:
        raise RobustTransferError("no sample photographs found (scikit-learn's china.jpg / flower.jpg, matplotlib's "
                                  "grace_hopper.jpg): reinstall scikit-learn and matplotlib")
    return [np.asarray(Image.open(p).convert("RGB")) for p in found]


def _crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    height, width = photo.shape[:2]
    side = int(rng.integers(min(height, width) // 4, min(height, width) + 1))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = torch.from_numpy(photo[top:top + side, left:left + side].copy()).permute(2, 0, 1)[None].float()
    return F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0] \
        .permute(1, 2, 0).clamp(0, 255).numpy()


def _object(image: torch.Tensor, side: int) -> np.ndarray:
    resized = F.interpolate(image[None].float(), size=(side, side), mode="bilinear", align_corners=False)[0, 0]
    return resized.clamp(0, 1).numpy()


def _draw_split(count: int, pool: tuple[torch.Tensor, torch.Tensor], recipe: SceneRecipe, photos: list[np.ndarray],
                rng: np.random.Generator, folder: Path) -> dict:
    images, labels = pool
    by_class = {c: torch.nonzero(labels == c).flatten().numpy() for c in recipe.classes}
    coco: dict = {"images": [], "annotations": [],
                  "categories": [{"id": i, "name": FASHION_CLASSES[c]} for i, c in enumerate(recipe.classes, 1)]}
    for index in range(count):
        scene = _crop(photos[int(rng.integers(len(photos)))], recipe.size, rng)
        placed: list[tuple[int, int, int, int]] = []
        for _ in range(int(rng.integers(recipe.objects[0], recipe.objects[1] + 1))):
            category = int(rng.integers(len(recipe.classes)))
            example = int(rng.choice(by_class[recipe.classes[category]]))
            side = int(round(28 * rng.uniform(*recipe.scale)))
            intensity = _object(images[example], side)
            mask = intensity > 0.15
            if not mask.any():
                continue
            rows, cols = np.nonzero(mask)
            for _attempt in range(50):
                top, left = int(rng.integers(0, recipe.size - side + 1)), int(rng.integers(0, recipe.size - side + 1))
                box = (left + cols.min(), top + rows.min(), left + cols.max() + 1, top + rows.max() + 1)
                if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in placed):
                    break
            else:
                continue  # no free place left for it: the scene keeps fewer objects
            placed.append(box)
            tint = rng.uniform(0.35, 1.0, size=3) * 255
            region = scene[top:top + side, left:left + side]
            region[mask] = intensity[mask, None] * tint
            full = np.zeros((recipe.size, recipe.size), dtype=np.uint8, order="F")
            full[top:top + side, left:left + side] = mask
            rle = coco_mask.encode(full)
            rle["counts"] = rle["counts"].decode("ascii")
            x1, y1, x2, y2 = (int(v) for v in box)
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": index + 1, "category_id": category + 1,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": int(mask.sum()), "iscrowd": 0, "segmentation": rle})
        name = f"{index:05d}.png"
        Image.fromarray(scene.round().astype(np.uint8)).save(folder / name)
        coco["images"].append({"id": index + 1, "file_name": name, "width": recipe.size, "height": recipe.size})
    return coco


def write_scenes(out: str | Path, recipe: SceneRecipe = SceneRecipe()) -> Path:
    """Draw the scenes of ``recipe`` into ``out`` (COCO-format folder layout); returns ``out``."""
    out = Path(out)
    fashion = load_dataset("fashion-mnist")
    pools = {"train": (fashion.train.images, fashion.train.labels), "val": (fashion.test.images, fashion.test.labels),
             "test": (fashion.test.images, fashion.test.labels)}
    photos = background_photos()
    rng = np.random.default_rng(recipe.seed)
    for split in ("train", "val", "test"):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        coco = _draw_split(getattr(recipe, split), pools[split], recipe, photos, rng, folder)
        (folder / "annotations.json").write_text(json.dumps(coco))
    (out / "recipe.json").write_text(json.dumps(asdict(recipe)))
    return out


def embedded_scenes(root: str | Path | None = None, recipe: SceneRecipe = SceneRecipe()) -> Path:
    """The folder of the embedded scenes for ``recipe``, drawn on first use (atomically: a half-drawn folder
    is never used) and reused afterwards."""
    base = Path(root) if root is not None else DEFAULT_ROOT
    target = base / f"scenes-{recipe.key()}"
    if (target / "recipe.json").exists():
        return target
    base.mkdir(parents=True, exist_ok=True)
    temporary = base / f".{target.name}.{os.getpid()}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    write_scenes(temporary, recipe)
    try:
        os.rename(temporary, target)
    except OSError:  # another process drew them meanwhile: theirs are the same scenes
        shutil.rmtree(temporary, ignore_errors=True)
    return target
