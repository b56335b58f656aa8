"""A small ILSVRC-2012-layout folder made of real photographs, to try the `imagenet` path without ImageNet.

Each class is one of the photographs installed packages ship (scikit-learn's china.jpg and flower.jpg,
matplotlib's grace_hopper.jpg), under a real ImageNet synset; its images are random crops of it (scale, position,
flip), saved as JPEGs at a chosen size (ImageNet's typical 500 x 375 by default). The labels of the flat val/ are
written the way the real archives carry them: Kaggle's LOC_val_solution.csv + LOC_synset_mapping.txt, or the
devkit's ground truth + meta.mat, or val/ sorted into synset folders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

from ..errors import RobustTransferError
from .imagenet import DEVKIT, GROUND_TRUTH, META, SOLUTION, SYNSET_NAMES
from .scenes import background_photos

# Three real ILSVRC-2012 synsets (their ILSVRC2012_IDs in the devkit are 449, 450, 442).
SAMPLE_SYNSETS = (("n01440764", 449, "tench, Tinca tinca"), ("n01443537", 450, "goldfish, Carassius auratus"),
                  ("n01484850", 442, "great white shark, white shark, man-eater"))
VAL_LABELS = ("solution", "devkit", "sorted")


def _crop(photo: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random crop of ``photo`` covering 30-90% of its shorter side, resized to ``size`` (width, height)."""
    height, width = photo.shape[:2]
    aspect = size[0] / size[1]
    crop_h = int(min(height, width / aspect) * rng.uniform(0.3, 0.9))
    crop_w = int(crop_h * aspect)
    top, left = int(rng.integers(0, height - crop_h + 1)), int(rng.integers(0, width - crop_w + 1))
    image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w]).resize(size, Image.Resampling.BILINEAR)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def write_imagenet_sample(root: str | Path, train_per_class: int = 20, val_per_class: int = 5,
                          size: tuple[int, int] = (500, 375), val_labels: str = "solution", seed: int = 0,
                          quality: int = 90) -> Path:
    """Write the sample folder at ``root`` (train/<synset>/, flat val/ labelled as ``val_labels`` says) and return
    it; ``size`` is (width, height) of every JPEG."""
    if val_labels not in VAL_LABELS:
        raise RobustTransferError(f"val_labels must be one of {', '.join(VAL_LABELS)}, got {val_labels!r}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    photos = background_photos()
    if len(photos) < len(SAMPLE_SYNSETS):
        raise RobustTransferError(f"the sample needs {len(SAMPLE_SYNSETS)} photographs, found {len(photos)}: "
                                  "reinstall scikit-learn and matplotlib")
    val_rows = []
    for (synset, _, _), photo in zip(SAMPLE_SYNSETS, photos[:len(SAMPLE_SYNSETS)], strict=True):
        folder = root / "train" / synset
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(train_per_class):
            _crop(photo, size, rng).save(folder / f"{synset}_{i + 1}.JPEG", quality=quality)
        val_rows += [(synset, _crop(photo, size, rng)) for _ in range(val_per_class)]
    order = rng.permutation(len(val_rows))  # classes interleaved in val/, as in the real one
    (root / "val").mkdir(parents=True, exist_ok=True)
    stems = []
    for number, row in enumerate(order, start=1):
        synset, image = val_rows[row]
        stem = f"ILSVRC2012_val_{number:08d}"
        folder = root / "val" / synset if val_labels == "sorted" else root / "val"
        folder.mkdir(exist_ok=True)
        image.save(folder / f"{stem}.JPEG", quality=quality)
        stems.append((stem, synset))
    if val_labels == "solution":
        width, height = size
        lines = [f"{stem},{synset} 0 0 {width - 1} {height - 1} " for stem, synset in stems]
        (root / SOLUTION).write_text("ImageId,PredictionString\n" + "\n".join(lines) + "\n")
        (root / SYNSET_NAMES).write_text("".join(f"{synset} {words}\n" for synset, _, words in SAMPLE_SYNSETS))
    elif val_labels == "devkit":
        ids = {synset: number for synset, number, _ in SAMPLE_SYNSETS}
        data = root / DEVKIT / Path(GROUND_TRUTH).parent
        data.mkdir(parents=True, exist_ok=True)
        (root / DEVKIT / GROUND_TRUTH).write_text("".join(f"{ids[synset]}\n" for _, synset in stems))
        table = np.array([(number, synset, words, 0) for synset, number, words in SAMPLE_SYNSETS],
                         dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
        savemat(root / DEVKIT / META, {"synsets": table})
    return root
