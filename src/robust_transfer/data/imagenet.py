"""ILSVRC-2012 (ImageNet) in the layouts it is distributed in, read as they are: nothing to rearrange.

- train/<synset>/*.JPEG, one folder per WordNet synset (n01440764, ...), at the root or under
  ILSVRC/Data/CLS-LOC/ (the Kaggle archive);
- val/ either flat (ILSVRC2012_val_00000001.JPEG, ...), labelled from LOC_val_solution.csv (Kaggle) or from the
  devkit (ILSVRC2012_devkit_t12/ or its .tar.gz: data/ILSVRC2012_validation_ground_truth.txt + data/meta.mat),
  or already sorted into val/<synset>/.

Those label files are looked for beside train/ and up to three folders above it. The classes are the train
synsets in sorted order (the order the released models' 1000 outputs follow); their names come from
LOC_synset_mapping.txt or the devkit, or, for the full 1000, from torchvision's ImageNet category list. ImageNet's
val/ is the test split (as everywhere: its real test labels were never released); validation is held out of train.
"""

from __future__ import annotations

import csv
import functools
import io
import re
import tarfile
from collections.abc import Callable
from pathlib import Path

from scipy.io import loadmat
from torch.utils.data import Dataset
from torchvision.models import ResNet50_Weights

from ..errors import RobustTransferError
from .decode import IMAGE_SUFFIXES
from .folder import TrainFiles, load_split, scan_split

SYNSET = re.compile(r"n\d{8}")
SOLUTION = "LOC_val_solution.csv"
SYNSET_NAMES = "LOC_synset_mapping.txt"
DEVKIT = "ILSVRC2012_devkit_t12"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"
LAYOUT = ("train/<synset>/<images> (e.g. train/n01440764/n01440764_10026.JPEG) and val/, flat with "
          f"{SOLUTION} or the devkit {DEVKIT}, or sorted into val/<synset>/")


def _base(root: Path) -> Path:
    """The folder holding train/: the root itself, or the Kaggle archive's ILSVRC/Data/CLS-LOC under it."""
    for base in (root, root / "ILSVRC" / "Data" / "CLS-LOC"):
        if (base / "train").is_dir():
            return base
    found = sorted(p.name for p in root.iterdir())[:8] if root.is_dir() else "the folder does not exist"
    raise RobustTransferError(f"{root} is not an ImageNet folder: expected {LAYOUT}; found {found}")


def _near(base: Path) -> list[Path]:
    """Where label files may sit: beside train/ and up to three folders above (the Kaggle root is three up)."""
    return [base, *list(base.parents)[:3]]


def _find(base: Path, name: str) -> Path | None:
    return next((folder / name for folder in _near(base) if (folder / name).exists()), None)


class _Devkit:
    """The devkit's files, from its extracted folder or straight from its .tar.gz."""

    def __init__(self, location: Path) -> None:
        self.location = location

    def read(self, member: str) -> bytes:
        if self.location.is_dir():
            path = self.location / member
            if not path.is_file():
                raise RobustTransferError(f"the devkit {self.location} lacks {member}")
            return path.read_bytes()
        try:
            with tarfile.open(self.location) as archive:
                handle = archive.extractfile(f"{DEVKIT}/{member}")
                return handle.read()
        except (tarfile.TarError, KeyError, OSError) as error:
            raise RobustTransferError(f"cannot read {member} from {self.location}: {error}") from None

    @functools.cached_property
    def synsets(self) -> list[tuple[int, str, str]]:
        """(ILSVRC2012_ID, synset, words) of the 1000 leaf synsets, from meta.mat (read once)."""
        try:
            table = loadmat(io.BytesIO(self.read(META)), squeeze_me=True)["synsets"]
            return [(int(row["ILSVRC2012_ID"]), str(row["WNID"]), str(row["words"]))
                    for row in table if int(row["num_children"]) == 0]
        except (ValueError, KeyError, TypeError) as error:
            raise RobustTransferError(f"{self.location}/{META} is not the devkit's synset table: {error}") from None

    def val_synsets(self) -> dict[str, str]:
        """Val image stem -> synset: line i of the ground truth is the ILSVRC2012_ID of image i."""
        by_id = {number: synset for number, synset, _ in self.synsets}
        lines = self.read(GROUND_TRUTH).decode().split()
        try:
            return {f"ILSVRC2012_val_{i:08d}": by_id[int(value)] for i, value in enumerate(lines, start=1)}
        except (KeyError, ValueError) as error:
            raise RobustTransferError(f"{self.location}/{GROUND_TRUTH} names ILSVRC2012_ID {error}, which meta.mat "
                                      "lacks") from None


def _devkit(base: Path) -> _Devkit | None:
    location = _find(base, DEVKIT) or _find(base, f"{DEVKIT}.tar.gz") or _find(base, f"{DEVKIT}.tar")
    return _Devkit(location) if location is not None else None


def _solution_synsets(path: Path) -> dict[str, str]:
    """Val image stem -> synset from Kaggle's LOC_val_solution.csv (its boxes' first synset: all are the same)."""
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in rows}
    except (KeyError, IndexError, AttributeError, csv.Error, UnicodeDecodeError) as error:
        raise RobustTransferError(f"{path} is not a LOC_val_solution.csv (ImageId,PredictionString rows): "
                                  f"{type(error).__name__} {error}") from None


def _val_labels(base: Path, devkit: _Devkit | None) -> tuple[Path, Callable[[], dict[str, str]]]:
    """Where the flat val/'s labels come from, and how to read them."""
    solution = _find(base, SOLUTION)
    if solution is not None:
        return solution, lambda: _solution_synsets(solution)
    if devkit is not None:
        return devkit.location, devkit.val_synsets
    raise RobustTransferError(
        f"{base / 'val'} holds images in one folder but nothing labels them: put {SOLUTION} (the Kaggle archive's) "
        f"or the devkit ({DEVKIT}/ or {DEVKIT}.tar.gz) beside train/ or in a folder above it, or sort val/ into "
        "val/<synset>/ folders")


def _flat_val(base: Path, synsets: list[str], devkit: _Devkit | None) -> tuple[list[Path], list[int]]:
    files = sorted(p for p in (base / "val").iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    source, read = _val_labels(base, devkit)
    labels_of = read()
    index = {synset: label for label, synset in enumerate(synsets)}
    labels = []
    for path in files:
        synset = labels_of.get(path.stem)
        if synset is None:
            raise RobustTransferError(f"{source} has no label for {path}: is it an ILSVRC-2012 validation image?")
        if synset not in index:
            raise RobustTransferError(f"{source} labels {path.name} with synset {synset}, which train/ lacks "
                                      f"(train/ has {len(synsets)} synset folders): add train/{synset}/, or "
                                      "remove the images of classes you do not train on from val/")
        labels.append(index[synset])
    return files, labels


def _class_names(base: Path, synsets: list[str], devkit: _Devkit | None) -> list[str]:
    """A readable name per synset ("tench"); a name two synsets share gets its synset ("crane n02012849")."""
    mapping = _find(base, SYNSET_NAMES)
    if mapping is not None:
        words = dict(line.split(" ", 1) for line in mapping.read_text().splitlines() if " " in line)
    elif devkit is not None:
        words = {synset: text for _, synset, text in devkit.synsets}
    elif len(synsets) == 1000:  # the full ILSVRC-2012 class list, in sorted-synset order
        words = dict(zip(synsets, ResNet50_Weights.IMAGENET1K_V1.meta["categories"], strict=True))
    else:
        return list(synsets)
    names = [words.get(synset, synset).split(",")[0].strip() for synset in synsets]
    return [f"{name} {synset}" if names.count(name) > 1 else name for name, synset in zip(names, synsets, strict=True)]


def load_imagenet(root: Path, size: int, channels: int) -> tuple[TrainFiles, None, Dataset | None]:
    """(train files, None, test = val/) of an ILSVRC-2012 folder at ``root`` (see the module docstring)."""
    base = _base(root)
    paths, labels, synsets = scan_split(base / "train", None)
    odd = [name for name in synsets if not SYNSET.fullmatch(name)]
    if odd:
        raise RobustTransferError(
            f"{base / 'train'} has class folder(s) not named by a WordNet synset (nXXXXXXXX): {', '.join(odd[:3])}; "
            "ImageNet's are (train/n01440764/...). For other class folders use --dataset imagefolder")
    devkit = _devkit(base)  # its synset table serves the names and the val labels alike
    names = _class_names(base, synsets, devkit)
    train = TrainFiles(paths, labels, names, size, channels, f"{root.name}/train")
    val_dir = base / "val"
    if not val_dir.is_dir():
        return train, None, None  # load_dataset holds a test share out of train
    if any(p.is_dir() for p in val_dir.iterdir()):
        val_paths, val_labels, _ = scan_split(val_dir, synsets)
    else:
        val_paths, val_labels = _flat_val(base, synsets, devkit)
    if not val_paths:
        raise RobustTransferError(f"{val_dir} holds no image files: expected {LAYOUT}")
    test = load_split(val_paths, val_labels, names, size, channels, f"{root.name}/val", held_out=True)
    return train, None, test
