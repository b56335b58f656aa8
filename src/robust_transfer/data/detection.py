"""Object detection and instance segmentation data: images with boxes (and masks), in the layouts users have.

Every layout is read into one form, a COCO-format dictionary (``images``, ``annotations`` with
``bbox = [x, y, w, h]`` in pixels, ``categories``) plus the folder its ``file_name`` entries are relative
to. That form is what pycocotools scores, so the ground truth a detector is measured against is the
file the user gave, not a copy of it.

Layouts:

- ``coco``: COCO 2017, ``annotations/instances_{train,val}2017.json`` beside ``train2017/``, ``val2017/``
  (``test2017`` has no public annotations: the paper reports on val2017, and so do we).
- ``voc``: Pascal VOC 2007 / 2012, ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/{split}.txt``
  and, for instance segmentation, ``SegmentationObject/*.png`` with ``ImageSets/Segmentation``. A
  folder holding ``VOC2007`` and ``VOC2012`` trains on both trainval sets and tests on 2007 test, as the
  detection literature does. VOC's "difficult" objects become ``iscrowd`` (ignored when scoring).
- ``coco-folder``: any COCO-format export: ``DIR/{train,val,test}/`` each holding one ``*.json`` and
  the images it names (Roboflow's and our embedded scenes' layout).

Reading checks what would otherwise fail deep in training: images named but missing or empty, boxes
outside their image, classes with evaluation instances and no training instances. Each is one line
naming the file and the first offender.
"""

from __future__ import annotations

import json
import logging
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as coco_mask
from torch.utils.data import DataLoader, Dataset

from ..errors import RobustTransferError
from .decode import DECODE_ERRORS, read_as_stored, read_palette_indices

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "coco", "voc", "coco-folder")
TASKS = ("detection", "instance-segmentation")
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
BOX_TOLERANCE = 1.0  # pixels a box may overrun its image (rounding in exporters); it is clipped
_FOLDER_SPLITS = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


@dataclass
class DetectionSplit:
    """One split in COCO form: ``coco`` (the dictionary) and ``image_root`` (its file names' folder)."""

    coco: dict[str, Any]
    image_root: Path
    source: str                       # the file or folder it was read from, for messages
    masks_from: str = "coco"          # "coco" (polygons / RLE in the annotations) or "voc" (SegmentationObject)

    @property
    def categories(self) -> list[dict[str, Any]]:
        return self.coco["categories"]

    def subset(self, image_ids: Sequence[int], source: str | None = None) -> DetectionSplit:
        """The same split restricted to ``image_ids`` (a held-out validation share)."""
        keep = set(image_ids)
        coco = {**self.coco, "images": [i for i in self.coco["images"] if i["id"] in keep],
                "annotations": [a for a in self.coco["annotations"] if a["image_id"] in keep]}
        return DetectionSplit(coco, self.image_root, source or self.source, self.masks_from)


@dataclass
class DetectionData:
    """What a detection run reads: ``train``, ``val`` (for selection, held out of train unless the layout has
    one to spare) and ``test`` (what is reported: COCO val2017, VOC 2007 test)."""

    train: DetectionSplit
    val: DetectionSplit
    test: DetectionSplit
    layout: str
    class_names: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- layouts


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise RobustTransferError(f"no annotation file {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RobustTransferError(f"cannot read the annotations {path}: {error}") from None
    if not isinstance(document, dict) or not all(k in document for k in ("images", "annotations", "categories")):
        raise RobustTransferError(f"{path} is not COCO-format annotations: it needs images, annotations and "
                                  "categories lists")
    return document


def _coco_split(root: Path, split: str) -> DetectionSplit:
    path = root / "annotations" / f"instances_{split}2017.json"
    return DetectionSplit(_read_json(path), root / f"{split}2017", str(path))


def _folder_split(root: Path, split: str) -> DetectionSplit | None:
    for name in _FOLDER_SPLITS[split]:
        folder = root / name
        if folder.is_dir():
            files = sorted(folder.glob("*.json"))
            if len(files) != 1:
                raise RobustTransferError(f"{folder} must hold exactly one COCO-format .json file, found "
                                          f"{len(files)}")
            return DetectionSplit(_read_json(files[0]), folder, str(files[0]))
    return None


def _voc_years(root: Path) -> list[Path]:
    if (root / "Annotations").is_dir():
        return [root]
    for parent in (root, root / "VOCdevkit"):
        years = sorted(p for p in parent.glob("VOC20*") if (p / "Annotations").is_dir())
        if years:
            return years
    return []


def _voc_ids(year: Path, split: str, task: str) -> list[str] | None:
    folder = "Segmentation" if task == "instance-segmentation" else "Main"
    path = year / "ImageSets" / folder / f"{split}.txt"
    if not path.exists():
        return None
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _voc_split(years: list[Path], root: Path, split: str, task: str) -> DetectionSplit | None:
    """VOC ``split`` (train, val, trainval, test) over ``years``, in COCO form; None when no year has it."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    label = {name: index for index, name in enumerate(VOC_CLASSES, start=1)}
    found = False
    for year in years:
        ids = _voc_ids(year, split, task)
        if ids is None:
            continue
        found = True
        for name in ids:
            xml_path = year / "Annotations" / f"{name}.xml"
            try:
                tree = ET.parse(xml_path).getroot()
            except (OSError, ET.ParseError) as error:
                raise RobustTransferError(f"cannot read the VOC annotation {xml_path}: {error}") from None
            size = tree.find("size")
            image_id = len(images) + 1
            width = int(size.findtext("width")) if size is not None else 0
            height = int(size.findtext("height")) if size is not None else 0
            images.append({"id": image_id, "file_name": str((year / "JPEGImages" / f"{name}.jpg").relative_to(root)),
                           "width": width, "height": height, "voc_name": name,
                           "voc_year": str(year.relative_to(root)) if year != root else "."})
            for index, obj in enumerate(tree.findall("object"), start=1):
                cls = obj.findtext("name", "").strip()
                if cls not in label:
                    raise RobustTransferError(f"{xml_path}: object class {cls!r} is not one of VOC's 20 classes")
                box = obj.find("bndbox")
                x1, y1, x2, y2 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
                # VOC boxes are 1-based inclusive pixel indices: [x1 - 1, x2] in continuous coordinates.
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label[cls],
                                    "bbox": [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1],
                                    "area": (x2 - x1 + 1) * (y2 - y1 + 1),
                                    "iscrowd": int(obj.findtext("difficult", "0").strip() == "1"),
                                    "voc_index": index})
    if not found:
        return None
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in label.items()]}
    return DetectionSplit(coco, root, f"{root} ({split})", masks_from="voc")


def detect_layout(root: Path) -> str:
    """Which layout ``root`` holds: coco, voc or coco-folder."""
    if (root / "annotations").is_dir() and any((root / "annotations").glob("instances_*2017.json")):
        return "coco"
    if _voc_years(root):
        return "voc"
    if any((root / name).is_dir() for names in _FOLDER_SPLITS.values() for name in names):
        return "coco-folder"
    raise RobustTransferError(
        f"{root} holds no detection data this tool reads: expected COCO 2017 (annotations/instances_train2017.json, "
        "train2017/), Pascal VOC (Annotations/, JPEGImages/, ImageSets/Main/) or a COCO-format folder "
        "(train/ and val/ or test/, each with one .json)")


def _hold_out(split: DetectionSplit, fraction: float, seed: int) -> tuple[DetectionSplit, DetectionSplit]:
    """A seeded ``fraction`` of ``split``'s images as validation, the rest as train."""
    ids = [image["id"] for image in split.coco["images"]]
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    count = max(1, round(fraction * len(ids))) if len(ids) > 1 else 0
    held = [ids[i] for i in order[:count]]
    kept = [ids[i] for i in order[count:]]
    return split.subset(kept, split.source), split.subset(held, f"{split.source} (held-out validation)")


def read_detection_data(root: str | Path, *, layout: str = "auto", task: str = "detection",
                        val_fraction: float = 0.1, seed: int = 0, check_files: bool = True) -> DetectionData:
    """Read a detection dataset at ``root`` into train / val / test splits, checked (see the module docstring).

    Validation is a seeded ``val_fraction`` of train, except in a COCO-format folder that has both
    val/ and test/ (then val/ is the validation split). Test is COCO's val2017, VOC 2007's test (else
    the val set), a folder's test/ (else its val/).
    """
    root = Path(root).expanduser()
    if task not in TASKS:
        raise RobustTransferError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    if layout not in LAYOUTS:
        raise RobustTransferError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if not 0 < val_fraction < 1:
        raise RobustTransferError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if not root.is_dir():
        raise RobustTransferError(f"no dataset folder {root}")
    layout = detect_layout(root) if layout == "auto" else layout
    val: DetectionSplit | None = None
    if layout == "coco":
        train, test = _coco_split(root, "train"), _coco_split(root, "val")
    elif layout == "voc":
        years = _voc_years(root)
        if not years:
            raise RobustTransferError(f"{root} has no VOC folders (Annotations/, JPEGImages/, ImageSets/)")
        test_years = [y for y in years if y.name == "VOC2007"] or years
        train = _voc_split(years, root, "trainval", task) or _voc_split(years, root, "train", task)
        test = _voc_split(test_years, root, "test", task) or _voc_split(test_years, root, "val", task)
        if train is None or test is None:
            where = "Segmentation" if task == "instance-segmentation" else "Main"
            raise RobustTransferError(f"{root}: ImageSets/{where}/ needs trainval.txt (or train.txt) and test.txt "
                                      "(or val.txt)")
    else:
        train = _folder_split(root, "train")
        held, tested = _folder_split(root, "val"), _folder_split(root, "test")
        if train is None or (held is None and tested is None):
            raise RobustTransferError(f"{root}: a COCO-format folder needs train/ and val/ or test/, each with one "
                                      ".json file and its images")
        test = tested or held
        val = held if tested is not None else None
    if val is None:
        train, val = _hold_out(train, val_fraction, seed)
    data = DetectionData(train, val, test, layout)
    check_detection_data(data, task, check_files=check_files)
    data.class_names = [c["name"] for c in sorted(train.categories, key=lambda c: c["id"])]
    return data


# ---------------------------------------------------------------------------------------------- checks


def _check_boxes(split: DetectionSplit) -> None:
    images = {image["id"]: image for image in split.coco["images"]}
    outside = []
    for annotation in split.coco["annotations"]:
        image = images.get(annotation["image_id"])
        if image is None:
            raise RobustTransferError(f"{split.source}: annotation {annotation.get('id')} names image "
                                      f"{annotation['image_id']}, which is not in its images list")
        x, y, w, h = (float(v) for v in annotation["bbox"])
        width, height = image.get("width") or 0, image.get("height") or 0
        if w <= 0 or h <= 0:
            raise RobustTransferError(f"{split.source}: annotation {annotation.get('id')} in {image['file_name']} has "
                                      f"an empty box {annotation['bbox']} (width and height must be > 0)")
        if width and height and (x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE
                                 or y + h > height + BOX_TOLERANCE):
            outside.append((annotation, image))
    if outside:
        annotation, image = outside[0]
        raise RobustTransferError(
            f"{split.source}: {len(outside)} box(es) lie outside their image, e.g. annotation {annotation.get('id')} "
            f"[x, y, w, h] = {annotation['bbox']} in {image['file_name']} ({image['width']}x{image['height']}); "
            "fix the annotations (boxes are [x, y, width, height] in pixels)")


def _check_files(split: DetectionSplit) -> None:
    missing, empty = [], []
    for image in split.coco["images"]:
        path = split.image_root / image["file_name"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            missing.append(path)
            continue
        if size == 0:
            empty.append(path)
    if missing:
        raise RobustTransferError(f"{split.source}: {len(missing)} image(s) named in the annotations are missing, "
                                  f"e.g. {missing[0]}")
    if empty:
        raise RobustTransferError(f"{split.source}: {len(empty)} image file(s) are empty (0 bytes), e.g. {empty[0]}; "
                                  "re-copy them or drop them from the annotations")


def _check_classes(data: DetectionData) -> None:
    names = {c["id"]: c["name"] for c in data.train.categories}
    trained = {a["category_id"] for a in data.train.coco["annotations"] if not a.get("iscrowd")}
    if not trained:
        raise RobustTransferError(f"{data.train.source}: no training image has an annotated object")
    for split in (data.val, data.test):
        counts: dict[int, int] = defaultdict(int)
        for annotation in split.coco["annotations"]:
            if annotation["category_id"] not in names:
                raise RobustTransferError(f"{split.source}: annotation {annotation.get('id')} has category "
                                          f"{annotation['category_id']}, which train's categories do not list")
            if not annotation.get("iscrowd"):
                counts[annotation["category_id"]] += 1
        absent = sorted(c for c in counts if c not in trained)
        if absent:
            first = absent[0]
            raise RobustTransferError(
                f"class {names[first]!r} has {counts[first]} instance(s) in {split.source} but none in training: a "
                f"detector cannot learn it ({len(absent)} such class(es)); add training images of it or drop it from "
                "the evaluation annotations")


def check_detection_data(data: DetectionData, task: str, check_files: bool = True) -> None:
    """Raise one clear `RobustTransferError` for the first problem in ``data`` (see the module docstring)."""
    for split in (data.train, data.val, data.test):
        if not split.coco["images"]:
            raise RobustTransferError(f"{split.source} has no images")
        _check_boxes(split)
        if check_files:
            _check_files(split)
        if task == "instance-segmentation" and split.masks_from == "coco":
            lacking = [a for a in split.coco["annotations"] if not a.get("segmentation")]
            if lacking:
                raise RobustTransferError(f"{split.source}: {len(lacking)} annotation(s) have no segmentation, e.g. "
                                          f"annotation {lacking[0].get('id')}; instance segmentation needs a mask for "
                                          "every object (or use --task detection)")
    _check_classes(data)


# ---------------------------------------------------------------------------------------------- the dataset


def decode(path: Path, channels: int) -> torch.Tensor:
    """An image file as a float [0, 1] tensor C x H x W with ``channels`` (1 or 3) channels."""
    try:
        raw = read_as_stored(path, channels)
    except DECODE_ERRORS as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise RobustTransferError(f"cannot decode the image {path}: {reason}") from None
    return raw.float().div_(255)


def _voc_masks(split: DetectionSplit, image: dict[str, Any], annotations: list[dict[str, Any]],
               height: int, width: int) -> torch.Tensor:
    year = split.image_root / image["voc_year"]
    path = year / "SegmentationObject" / f"{image['voc_name']}.png"
    try:
        # palette PNG: pixel value i is the i-th object of the XML, 255 the void border
        indices = read_palette_indices(path)
    except DECODE_ERRORS as error:
        raise RobustTransferError(f"cannot read the instance mask {path}: {error}") from None
    return torch.stack([indices == a["voc_index"] for a in annotations]).to(torch.uint8) if annotations else \
        torch.zeros(0, height, width, dtype=torch.uint8)


def _coco_masks(annotations: list[dict[str, Any]], height: int, width: int) -> torch.Tensor:
    if not annotations:
        return torch.zeros(0, height, width, dtype=torch.uint8)
    masks = []
    for annotation in annotations:
        segmentation = annotation["segmentation"]
        if isinstance(segmentation, list):  # polygons
            rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
            rle = coco_mask.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        masks.append(torch.from_numpy(coco_mask.decode(rle).astype(np.uint8)))
    return torch.stack(masks)


class DetectionDataset(Dataset):
    """A `DetectionSplit` as torchvision's detectors read it: item ``(index, flip)`` gives ``(image, target)``.

    ``image`` is float [0, 1], C x H x W; ``target`` has ``boxes`` (x1, y1, x2, y2 pixels, float), ``labels``
    (1..K in the order of the categories' ids; 0 is the background), ``image_id`` and, with ``masks``,
    ``masks`` (N x H x W uint8). Crowd (and VOC difficult) objects are left out of training targets: the
    scorer ignores them. ``flip`` mirrors the image and its targets horizontally (the training augmentation).
    """

    def __init__(self, split: DetectionSplit, *, channels: int = 3, masks: bool = False) -> None:
        self.split, self.channels, self.masks = split, channels, masks
        self.images = split.coco["images"]
        ids = sorted(c["id"] for c in split.categories)
        self.label_of = {category: label for label, category in enumerate(ids, start=1)}
        self.category_of = {label: category for category, label in self.label_of.items()}
        self.by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for annotation in split.coco["annotations"]:
            if not annotation.get("iscrowd"):
                self.by_image[annotation["image_id"]].append(annotation)

    def __len__(self) -> int:
        return len(self.images)

    def with_objects(self) -> list[int]:
        """Indices of the images with at least one object (training skips the others, as detectron2 does)."""
        return [i for i, image in enumerate(self.images) if self.by_image.get(image["id"])]

    def __getitem__(self, item: int | tuple[int, bool]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index, flip = item if isinstance(item, tuple) else (item, False)
        info = self.images[index]
        image = decode(self.split.image_root / info["file_name"], self.channels)
        height, width = image.shape[-2:]
        annotations = self.by_image.get(info["id"], [])
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        target = {"boxes": boxes, "image_id": torch.tensor(info["id"]),
                  "labels": torch.tensor([self.label_of[a["category_id"]] for a in annotations], dtype=torch.int64)}
        if self.masks:
            target["masks"] = (_voc_masks(self.split, info, annotations, height, width)
                               if self.split.masks_from == "voc" else _coco_masks(annotations, height, width))
        if flip:
            image = image.flip(-1)
            target["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target


def _collate(items: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    return [image for image, _ in items], [target for _, target in items]


def detection_batches(dataset: DetectionDataset, batch_size: int, *, indices: Sequence[int] | None = None,
                      shuffle: bool = False, flip: bool = False, seed: int = 0, epoch: int = 0, rank: int = 0,
                      world_size: int = 1, workers: int = 0, drop_last: bool = False
                      ) -> Iterator[tuple[list[torch.Tensor], list[dict]]]:
    """Batches of (images, targets) in an order and with flips fixed by (seed, epoch): the same in a resumed run,
    whatever the number of workers. With ``world_size`` > 1 this process gets every ``world_size``-th batch."""
    order = list(range(len(dataset)) if indices is None else indices)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if shuffle:
        order = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
    flips = (torch.rand(len(order), generator=generator) < 0.5).tolist() if flip else [False] * len(order)
    items = list(zip(order, flips, strict=True))
    count = len(items) // batch_size if drop_last else -(-len(items) // batch_size)
    count -= count % world_size if world_size > 1 else 0
    mine = [items[b * batch_size:(b + 1) * batch_size] for b in range(rank, count, world_size)]
    # the batches' (index, flip) keys go to the dataset as they are: workers decode, the order stays ours
    return iter(DataLoader(dataset, batch_sampler=mine, num_workers=workers, collate_fn=_collate))


def count_batches(count: int, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
    """How many batches `detection_batches` gives each process for ``count`` images."""
    batches = count // batch_size if drop_last else -(-count // batch_size)
    return (batches - batches % world_size) // world_size if world_size > 1 else batches
