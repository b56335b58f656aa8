"""Readers for the official (as distributed) layouts of the paper's transfer datasets.

Each reader takes the folder its layout was found in and returns `FileSplits`: the class names
in a fixed order and (path, label) lists for train and test. Nothing is decoded here; the
registry module checks which files exist and decodes them. Where a set has an official
validation split the paper trained on (Aircraft trainval, DTD train+val, Flowers trn+val),
it is merged into train.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RobustTransferError
from .folder import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

SPLIT_SEED = 0  # seeds the per-class train/test draw of the Caltech sets (fixed: the test set never moves)
CALTECH101_TRAIN_PER_CLASS = 30
CALTECH256_TRAIN_PER_CLASS = 60

# Oxford Flowers-102 ships labels 1..102 without names; these are the names in common use (label order).
FLOWER_NAMES = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold", "tiger lily",
    "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot", "king protea",
    "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william", "carnation",
    "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower",
    "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia",
    "pink-yellow dahlia", "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush",
    "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania",
    "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower", "lotus", "toad lily",
    "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
)

Items = list[tuple[Path, int]]


@dataclass
class FileSplits:
    """What a reader found: class names (index = label) and the listed train and test files."""

    class_names: list[str]
    train: Items
    test: Items


# --- small parsers -------------------------------------------------------------------------------------------

def _rows(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped line) of a text file, blank lines and '#' comments left out."""
    if not path.is_file():
        raise RobustTransferError(f"{path} is missing")
    with open(path, encoding="utf-8", errors="replace") as handle:
        return [(number, line.strip()) for number, line in enumerate(handle, 1)
                if line.strip() and not line.lstrip().startswith("#")]


def _lines(path: Path) -> list[str]:
    return [line for _, line in _rows(path)]


def _table(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    """A tab-separated file with a header row; every row must hold ``columns``."""
    rows = _rows(path)
    header = rows[0][1].split("\t") if rows else []
    absent = [column for column in columns if column not in header]
    if absent:
        raise RobustTransferError(f"{path} lacks the header column(s) {', '.join(absent)} (header: {header[:8]})")
    where = {column: header.index(column) for column in columns}
    table = []
    for number, line in rows[1:]:
        values = line.split("\t")
        if len(values) <= max(where.values()):
            raise RobustTransferError(f"{path} line {number}: expected {len(header)} tab-separated fields")
        table.append({column: values[index].strip() for column, index in where.items()})
    return table


def _loadmat(path: Path, *keys: str) -> dict:
    if not path.is_file():
        raise RobustTransferError(f"{path} is missing")
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError:
        raise RobustTransferError(f"reading {path.name} needs scipy: pip install scipy") from None
    try:
        content = loadmat(path, squeeze_me=True)
    except (MatReadError, ValueError, OSError, TypeError, NotImplementedError) as error:
        raise RobustTransferError(f"cannot read {path} as a MATLAB file: {error}") from None
    absent = [key for key in keys if key not in content]
    if absent:
        raise RobustTransferError(f"{path} lacks the variable(s) {', '.join(absent)}")
    return content


def _vector(value) -> list:
    return np.atleast_1d(value).ravel().tolist()


def _integers(path: Path, value, what: str) -> list[int]:
    try:
        return [int(item) for item in _vector(value)]
    except (TypeError, ValueError):
        raise RobustTransferError(f"{path}: {what} must be integers") from None


def _check_label(label: int, count: int, where: str) -> int:
    if not 0 <= label < count:
        raise RobustTransferError(f"{where}: label {label + 1} is outside 1..{count}")
    return label


def _images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (not in its subfolders), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# --- the readers -----------------------------------------------------------------------------------------------

def read_aircraft(base: Path) -> FileSplits:
    """FGVC-Aircraft 2013b ``data/``: variants.txt and images_variant_{trainval,test}.txt ("<id> <variant>")."""
    variants = _lines(base / "variants.txt")
    index = {name: label for label, name in enumerate(variants)}

    def listed(*files: str) -> Items:
        items = []
        for file in files:
            for number, line in _rows(base / file):
                image, _, variant = line.partition(" ")
                if variant not in index:
                    raise RobustTransferError(f"{base / file} line {number}: unknown variant {variant!r}")
                items.append((base / "images" / f"{image}.jpg", index[variant]))
        return items

    trainval = ("images_variant_trainval.txt",)
    if not (base / trainval[0]).is_file():  # the train and val lists make the same split
        trainval = ("images_variant_train.txt", "images_variant_val.txt")
    return FileSplits(variants, listed(*trainval), listed("images_variant_test.txt"))


def read_birdsnap(base: Path) -> FileSplits:
    """Birdsnap 1.1: species.txt, images.txt (the full list), test_images.txt; images from get_birdsnap.py."""
    species = sorted(_table(base / "species.txt", ("id", "common")), key=lambda row: int(row["id"]))
    label_of = {row["id"]: label for label, row in enumerate(species)}
    folder = next((f for f in (base / "download" / "images", base / "images") if f.is_dir()), None)
    if folder is None:
        raise RobustTransferError(f"{base} has no download/images/: run get_birdsnap.py there first")
    test_paths = {line for line in _lines(base / "test_images.txt") if line != "path"}
    train, test = [], []
    for row in _table(base / "images.txt", ("path", "species_id")):
        if row["species_id"] not in label_of:
            raise RobustTransferError(f"{base / 'images.txt'}: species_id {row['species_id']} is not in species.txt")
        (test if row["path"] in test_paths else train).append((folder / row["path"], label_of[row["species_id"]]))
    return FileSplits([row["common"] for row in species], train, test)


def _read_caltech(folder: Path, per_class: int, dropped: set[str], name_of) -> FileSplits:
    """``per_class`` images of every class drawn with SPLIT_SEED for train, the rest for test."""
    generator = np.random.default_rng(SPLIT_SEED)
    class_names, train, test = [], [], []
    for class_dir in sorted(d for d in folder.iterdir() if d.is_dir() and d.name not in dropped):
        files = _images(class_dir)
        if not files:
            log.warning("%s: skipped the empty class folder %s", folder, class_dir.name)
            continue
        label = len(class_names)
        class_names.append(name_of(class_dir.name))
        order = generator.permutation(len(files))
        count = min(per_class, max(len(files) - 1, 1))  # a class this small only occurs in trimmed copies
        if count < per_class:
            log.warning("%s: class %s has %d image(s), so %d go to train", folder, class_dir.name, len(files), count)
        train += [(files[i], label) for i in sorted(order[:count])]
        test += [(files[i], label) for i in sorted(order[count:])]
    return FileSplits(class_names, train, test)


def read_caltech101(base: Path) -> FileSplits:
    """101_ObjectCategories/<class>/ minus BACKGROUND_Google (not a class); 'water_lilly' -> 'water lilly'."""
    return _read_caltech(base / "101_ObjectCategories", CALTECH101_TRAIN_PER_CLASS, {"BACKGROUND_Google"},
                         lambda name: name.replace("_", " "))


def read_caltech256(base: Path) -> FileSplits:
    """256_ObjectCategories/NNN.<class>/ (257 classes with 257.clutter); names lose the NNN. prefix."""
    return _read_caltech(base / "256_ObjectCategories", CALTECH256_TRAIN_PER_CLASS, set(),
                         lambda name: name.split(".", 1)[-1])


def _car_annotations(path: Path, fields: tuple[str, ...]) -> list[dict]:
    annotations = np.atleast_1d(_loadmat(path, "annotations")["annotations"])
    absent = [field for field in fields if annotations.dtype.names is None or field not in annotations.dtype.names]
    if absent:
        raise RobustTransferError(f"{path}: the annotations lack the field(s) {', '.join(absent)}")
    return [{field: _vector(annotations[field])[i] for field in fields} for i in range(len(annotations))]


def _car_items(path: Path, folder: Path, name_field: str, count: int) -> Items:
    items = []
    for row in _car_annotations(path, (name_field, "class")):
        label = _check_label(int(row["class"]) - 1, count, str(path))
        items.append((folder / str(row[name_field]), label))
    return items


def read_stanford_cars(base: Path) -> FileSplits:
    """cars_train/, cars_test/, devkit/cars_{meta,train_annos}.mat and cars_test_annos_withlabels.mat."""
    names = [str(name).strip() for name in _vector(_loadmat(base / "devkit" / "cars_meta.mat",
                                                            "class_names")["class_names"])]
    test_annotations = next((p for p in (base / "cars_test_annos_withlabels.mat",
                                         base / "devkit" / "cars_test_annos_withlabels.mat") if p.is_file()), None)
    if test_annotations is None:
        raise RobustTransferError(
            f"{base} lacks cars_test_annos_withlabels.mat (the test labels, a separate download; "
            "devkit/cars_test_annos.mat has no labels)")
    train = _car_items(base / "devkit" / "cars_train_annos.mat", base / "cars_train", "fname", len(names))
    return FileSplits(names, train, _car_items(test_annotations, base / "cars_test", "fname", len(names)))


def read_stanford_cars_all(base: Path) -> FileSplits:
    """The all-in-one release: car_ims/ and cars_annos.mat (relative_im_path, class, test flag, class_names)."""
    content = _loadmat(base / "cars_annos.mat", "annotations", "class_names")
    names = [str(name).strip() for name in _vector(content["class_names"])]
    train, test = [], []
    for row in _car_annotations(base / "cars_annos.mat", ("relative_im_path", "class", "test")):
        label = _check_label(int(row["class"]) - 1, len(names), str(base / "cars_annos.mat"))
        (test if int(row["test"]) else train).append((base / str(row["relative_im_path"]), label))
    return FileSplits(names, train, test)


def read_dtd(base: Path) -> FileSplits:
    """dtd/images/<class>/ with labels/{train,val,test}1.txt (split 1): train+val vs test."""
    lists = {split: _lines(base / "labels" / f"{split}1.txt") for split in ("train", "val", "test")}
    class_names = sorted({line.split("/", 1)[0] for lines in lists.values() for line in lines})
    label_of = {name: label for label, name in enumerate(class_names)}

    def items(*splits: str) -> Items:
        return [(base / "images" / line, label_of[line.split("/", 1)[0]]) for split in splits for line in lists[split]]

    return FileSplits(class_names, items("train", "val"), items("test"))


def read_flowers102(base: Path) -> FileSplits:
    """jpg/image_NNNNN.jpg, imagelabels.mat (labels 1..102) and setid.mat (trnid, valid, tstid)."""
    labels_path, setid_path = base / "imagelabels.mat", base / "setid.mat"
    labels = _integers(labels_path, _loadmat(labels_path, "labels")["labels"], "labels")
    setid = _loadmat(setid_path, "trnid", "valid", "tstid")
    count = max(labels, default=0)
    if not labels or min(labels) < 1 or count > len(FLOWER_NAMES):
        raise RobustTransferError(f"{labels_path}: labels must lie in 1..{len(FLOWER_NAMES)}")

    def items(*keys: str) -> Items:
        chosen = []
        for key in keys:
            for image in _integers(setid_path, setid[key], key):
                if not 1 <= image <= len(labels):
                    raise RobustTransferError(f"{setid_path}: {key} names image {image}, beyond the {len(labels)} "
                                              "labelled in imagelabels.mat")
                chosen.append((base / "jpg" / f"image_{image:05d}.jpg", labels[image - 1] - 1))
        return chosen

    return FileSplits(list(FLOWER_NAMES[:count]), items("trnid", "valid"), items("tstid"))


def read_food101(base: Path) -> FileSplits:
    """food-101/images/<class>/<id>.jpg with meta/classes.txt, labels.txt (names), train.txt, test.txt."""
    classes = _lines(base / "meta" / "classes.txt")
    label_of = {name: label for label, name in enumerate(classes)}
    names = [name.replace("_", " ") for name in classes]
    if (base / "meta" / "labels.txt").is_file() and len(_lines(base / "meta" / "labels.txt")) == len(classes):
        names = _lines(base / "meta" / "labels.txt")

    def items(split: str) -> Items:
        listed = []
        for number, line in _rows(base / "meta" / f"{split}.txt"):
            name = line.split("/", 1)[0]
            if name not in label_of:
                raise RobustTransferError(f"{base / 'meta' / split}.txt line {number}: class {name!r} is not in "
                                          "classes.txt")
            listed.append((base / "images" / f"{line}.jpg", label_of[name]))
        return listed

    return FileSplits(names, items("train"), items("test"))


def read_pets(base: Path) -> FileSplits:
    """Oxford-IIIT Pets: images/<Breed>_<n>.jpg, annotations/{trainval,test}.txt ("<image> <class id> ...")."""
    names: dict[int, str] = {}
    splits = {}
    for split in ("trainval", "test"):
        path = base / "annotations" / f"{split}.txt"
        listed = []
        for number, line in _rows(path):
            fields = line.split()
            if len(fields) < 2 or not fields[1].isdigit() or int(fields[1]) < 1:
                raise RobustTransferError(f"{path} line {number}: expected '<image> <class id 1..37> ...'")
            breed = fields[0].rsplit("_", 1)[0]
            names.setdefault(int(fields[1]), " ".join(part[:1].upper() + part[1:] for part in breed.split("_")))
            listed.append((base / "images" / f"{fields[0]}.jpg", int(fields[1]) - 1))
        splits[split] = listed
    absent = [str(number) for number in range(1, max(names, default=0) + 1) if number not in names]
    if not names or absent:
        raise RobustTransferError(f"{base / 'annotations'}: class id(s) {', '.join(absent[:5]) or 'all'} "
                                  "have no image")
    return FileSplits([names[number] for number in sorted(names)], splits["trainval"], splits["test"])


def sun397_partitions(base: Path) -> Path | None:
    """The folder holding Training_01.txt for the SUN397 images at ``base`` (inside it or beside it)."""
    for folder in (base / "Partitions", base, base.parent / "Partitions", base.parent):
        if (folder / "Training_01.txt").is_file():
            return folder
    return None


def _sun_name(class_path: str) -> str:
    """'/a/apartment_building/outdoor' -> 'apartment building (outdoor)'."""
    parts = [part.replace("_", " ") for part in class_path.strip("/").split("/")[1:]]
    return parts[0] + "".join(f" ({part})" for part in parts[1:])


def read_sun397(base: Path) -> FileSplits:
    """SUN397/<letter>/<class>[/<sub>]/*.jpg with Partitions/Training_01.txt and Testing_01.txt (split 1)."""
    partitions = sun397_partitions(base)
    if partitions is None:
        raise RobustTransferError(f"no Partitions/Training_01.txt in or beside {base}")
    lists = {split: _lines(partitions / f"{split}_01.txt") for split in ("Training", "Testing")}
    class_file = next((p for p in (partitions / "ClassName.txt", base / "ClassName.txt") if p.is_file()), None)
    listed = sorted({line.rsplit("/", 1)[0] for lines in lists.values() for line in lines})
    classes = [line.rstrip("/") for line in _lines(class_file)] if class_file else listed
    label_of = {name: label for label, name in enumerate(classes)}
    unknown = [name for name in listed if name not in label_of]
    if unknown:
        raise RobustTransferError(f"{class_file}: the partitions name class(es) it lacks: {', '.join(unknown[:5])}")

    def items(split: str) -> Items:
        return [(base / line.lstrip("/"), label_of[line.rsplit("/", 1)[0]]) for line in lists[split]]

    return FileSplits([_sun_name(name) for name in classes], items("Training"), items("Testing"))
