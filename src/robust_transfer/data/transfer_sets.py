"""The paper's transfer datasets (Aircraft, Birdsnap, Caltech-101/256, Stanford Cars, DTD, Flowers-102,
Food-101, Oxford-IIIT Pets, SUN397), each read from a local folder in one of two layouts:

* its official layout as distributed (the folder its archive extracts to, or that folder's parent), with the
  paper's split: see `sets_official` for what each reader expects;
* the prepared layout the paper's code used: root/train/<class>/ + root/test/<class>/ (val/ optional).

Without a root, a set is looked for in DATA_HOME/<name>. Nothing is ever downloaded. Images are decoded
at ``image_size`` (224 unless given) through `load_split`, so undecodable files are skipped and counted;
files an official list names but the disk lacks are skipped and counted too. Official validation splits
are merged into train (as in the paper); `load_dataset` then holds out a seeded validation share, decoded
again from its files, like test, with the paper's test transform.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import RobustTransferError
from . import registry
from . import sets_official as official
from .folder import TrainFiles, load_image_folder, load_split
from .registry import DEFAULT_FOLDER_SIZE, DatasetEntry, LoadRequest, register_dataset

log = logging.getLogger(__name__)

PREPARED_LAYOUT = "train/<class>/<images> + test/<class>/<images> (val/<class>/ optional)"


@dataclass(frozen=True)
class Layout:
    """An official layout: its key files (for messages), where it sits under a root, and its reader."""

    describe: str
    locate: Callable[[Path], Path | None]
    read: Callable[[Path], official.FileSplits]


def under(marker: str, *subdirs: str) -> Callable[[Path], Path | None]:
    """Find the folder holding ``marker``: the root itself, one of ``subdirs`` of it, or (for a one-part
    marker) the root's parent when the root *is* the marker folder."""
    def locate(root: Path) -> Path | None:
        for sub in ("", *subdirs):
            base = root / sub if sub else root
            if (base / marker).exists():
                return base
        if "/" not in marker and root.name == marker and root.is_dir():
            return root.parent
        return None
    return locate


def _sun397_locate(root: Path) -> Path | None:
    for base in (root / "SUN397", root):
        if base.is_dir() and official.sun397_partitions(base) is not None:
            return base
    return None


LAYOUTS: dict[str, tuple[Layout, ...]] = {
    "aircraft": (Layout(
        "fgvc-aircraft-2013b/data/ with variants.txt, images_variant_trainval.txt, images_variant_test.txt, images/",
        under("images_variant_test.txt", "data", "fgvc-aircraft-2013b/data"), official.read_aircraft),),
    "birdsnap": (Layout(
        "birdsnap/ with species.txt, images.txt, test_images.txt and the images get_birdsnap.py saved in "
        "download/images/", under("test_images.txt", "birdsnap"), official.read_birdsnap),),
    "caltech101": (Layout("101_ObjectCategories/<class>/*.jpg",
                          under("101_ObjectCategories", "caltech-101", "caltech101"), official.read_caltech101),),
    "caltech256": (Layout("256_ObjectCategories/NNN.<class>/*.jpg",
                          under("256_ObjectCategories", "caltech-256", "caltech256"), official.read_caltech256),),
    "stanford_cars": (
        Layout("cars_train/, cars_test/, devkit/cars_meta.mat, devkit/cars_train_annos.mat, "
               "cars_test_annos_withlabels.mat", under("devkit/cars_meta.mat", "stanford_cars", "stanford-cars"),
               official.read_stanford_cars),
        Layout("car_ims/ with cars_annos.mat", under("cars_annos.mat", "stanford_cars", "stanford-cars"),
               official.read_stanford_cars_all)),
    "dtd": (Layout("dtd/ with images/<class>/ and labels/train1.txt, val1.txt, test1.txt",
                   under("labels/test1.txt", "dtd"), official.read_dtd),),
    "flowers102": (Layout("jpg/image_NNNNN.jpg with imagelabels.mat and setid.mat beside jpg/",
                          under("setid.mat", "flowers-102", "flowers102"), official.read_flowers102),),
    "food101": (Layout("food-101/ with images/<class>/ and meta/classes.txt, train.txt, test.txt",
                       under("meta/test.txt", "food-101"), official.read_food101),),
    "pets": (Layout("images/*.jpg with annotations/trainval.txt and annotations/test.txt",
                    under("annotations/test.txt", "oxford-iiit-pet", "pets"), official.read_pets),),
    "sun397": (Layout("SUN397/<letter>/<class>/*.jpg with Partitions/Training_01.txt and Testing_01.txt "
                      "(in SUN397/ or beside it)", _sun397_locate, official.read_sun397),),
}

MEAN_PER_CLASS = {"aircraft", "pets", "caltech101", "caltech256", "flowers102"}


def _found(root: Path) -> str:
    if not root.exists():
        return "the folder does not exist"
    if not root.is_dir():
        return "it is a file, not a folder"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    if not names:
        return "an empty folder"
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def _present(name: str, split: str, items: official.Items, where: Path) -> official.Items:
    kept = [(path, label) for path, label in items if path.is_file()]
    if not items:
        raise RobustTransferError(f"{where}: the {split} split lists no image")
    if not kept:
        raise RobustTransferError(f"{where}: none of the {len(items)} {split} image(s) it lists is on disk "
                                  f"(first: {items[0][0]})")
    if len(kept) < len(items):
        missing = [str(path.relative_to(where)) for path, _ in items if not path.is_file()]
        log.warning("%s/%s: %d of %d listed image(s) are not on disk, skipped: %s%s", name, split, len(missing),
                    len(items), ", ".join(missing[:3]), " ..." if len(missing) > 3 else "")
    return kept


def _load_official(name: str, layout: Layout, base: Path, size: int, channels: int) -> tuple:
    try:
        files = layout.read(base)
        listed = {"train": _present(name, "train", files.train, base), "test": _present(name, "test", files.test, base)}
    except RobustTransferError as error:
        raise RobustTransferError(f"{name}: {error} (official layout: {layout.describe})") from None
    paths, labels = ({split: [item[i] for item in items] for split, items in listed.items()} for i in (0, 1))
    train = TrainFiles(paths["train"], labels["train"], files.class_names, size, channels, f"{name}/train")
    test = load_split(paths["test"], labels["test"], files.class_names, size, channels, f"{name}/test", held_out=True)
    return train, None, test  # train is decoded by load_dataset, once it has held out validation


def load_transfer_set(name: str, request: LoadRequest) -> tuple:
    """(train, None or val, test) of one of the transfer sets, in whichever layout its folder holds."""
    root = request.root if request.root is not None else registry.DATA_HOME / name
    size, channels = request.image_size or DEFAULT_FOLDER_SIZE, request.in_channels or 3
    if (root / "train").is_dir() and ((root / "test").is_dir() or (root / "val").is_dir()):
        return load_image_folder(root, size, channels)
    if root.is_dir():
        for layout in LAYOUTS[name]:
            base = layout.locate(root)
            if base is not None:
                return _load_official(name, layout, base, size, channels)
    default = " (the default place: pass root= or --data-root to read another folder)" if request.root is None else ""
    official_layouts = "; or ".join(layout.describe for layout in LAYOUTS[name])
    raise RobustTransferError(
        f"no {name} dataset in {root}{default}. Expected either its official layout: {official_layouts} (in this "
        f"folder or in the folder its archive extracts to); or the prepared layout: {PREPARED_LAYOUT}. "
        f"Found: {_found(root)}")


def _register() -> None:
    for name in LAYOUTS:
        metric = "mean_per_class" if name in MEAN_PER_CLASS else "top1"
        register_dataset(name, DatasetEntry(lambda request, name=name: load_transfer_set(name, request),
                                            "resized-crop-flip", metric))


_register()
