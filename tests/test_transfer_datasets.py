"""The paper's transfer datasets: tiny generated copies of every official layout and of the prepared one."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from robust_transfer import RobustTransferError
from robust_transfer.data import list_datasets, load_dataset, registry, sets_official

NAMES = ["aircraft", "birdsnap", "caltech101", "caltech256", "stanford_cars", "dtd", "flowers102", "food101", "pets",
         "sun397"]
MEAN_PER_CLASS = {"aircraft", "pets", "caltech101", "caltech256", "flowers102"}
RNG = np.random.default_rng(0)


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(path)
    return path


def _text(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def _cell(strings: list[str]) -> np.ndarray:
    cell = np.empty((1, len(strings)), dtype=object)
    cell[0, :] = strings
    return cell


def _car_annotations(rows: list[tuple[str, int]], name_field: str = "fname", test: int | None = None) -> np.ndarray:
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", name_field] + ([] if test is None else ["test"])
    table = np.zeros((1, len(rows)), dtype=[(field, object) for field in fields])
    for i, (name, label) in enumerate(rows):
        table[0, i] = (1, 1, 9, 9, label, name) + (() if test is None else (test,))
    return table


# --- official layouts: each builder writes a tiny copy and returns (class names, train size, test size) ---------

def _aircraft(root: Path, monkeypatch) -> tuple:
    base, variants = root / "fgvc-aircraft-2013b" / "data", ["707-320", "A300B4", "F/A-18"]
    _text(base / "variants.txt", variants)
    rows = {"trainval": [], "test": []}
    for index in range(9):
        image, variant = f"{1000000 + index:07d}", variants[index % 3]
        _image(base / "images" / f"{image}.jpg")
        rows["test" if index >= 6 else "trainval"].append(f"{image} {variant}")
    for split, lines in rows.items():
        _text(base / f"images_variant_{split}.txt", lines)
    return variants, 6, 3


def _birdsnap(root: Path, monkeypatch) -> tuple:
    base = root / "birdsnap"
    _text(base / "species.txt", ["id\tcommon\tscientific\tdir", "2\tAcadian Flycatcher\tEmpidonax virescens\tAF",
                                 "1\tAbert's Towhee\tMelozone aberti\tAT", "3\tAcorn Woodpecker\tM. formicivorus\tAW"])
    images, test = ["url\tmd5\tpath\tspecies_id\tbb_x1\tbb_y1\tbb_x2\tbb_y2"], ["path"]
    for species, folder in ((1, "AT"), (2, "AF"), (3, "AW")):
        for index in range(3):
            path = f"{folder}/{index}.jpg"
            _image(base / "download" / "images" / path)
            images.append(f"http://x/{path}\t0\t{path}\t{species}\t1\t1\t5\t5")
            test += [path] if index == 2 else []
    images.append("http://x/AT/9.jpg\t0\tAT/9.jpg\t1\t1\t1\t5\t5")  # failed to download: skipped
    _text(base / "images.txt", images)
    _text(base / "test_images.txt", test)
    return ["Abert's Towhee", "Acadian Flycatcher", "Acorn Woodpecker"], 6, 3


def _caltech101(root: Path, monkeypatch) -> tuple:
    monkeypatch.setattr(sets_official, "CALTECH101_TRAIN_PER_CLASS", 2)
    for folder, count in (("BACKGROUND_Google", 3), ("Faces_easy", 4), ("accordion", 3), ("airplanes", 5)):
        for index in range(count):
            _image(root / "caltech-101" / "101_ObjectCategories" / folder / f"image_{index + 1:04d}.jpg")
    return ["Faces easy", "accordion", "airplanes"], 6, 6


def _caltech256(root: Path, monkeypatch) -> tuple:
    monkeypatch.setattr(sets_official, "CALTECH256_TRAIN_PER_CLASS", 3)
    base = root / "256_ObjectCategories"
    for folder in ("001.ak47", "002.american-flag", "257.clutter"):
        for index in range(4):
            _image(base / folder / f"{folder[:3]}_{index + 1:04d}.jpg")
    _image(base / "001.ak47" / "greg" / "001_0001.jpg")  # a nested copy: not counted
    (base / "001.ak47" / "RENAME2").write_text("not an image")
    return ["ak47", "american-flag", "clutter"], 9, 3


def _cars(root: Path, monkeypatch) -> tuple:
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]
    (root / "devkit").mkdir()
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": _cell(names)})
    rows = {"train": [], "test": []}
    for index in range(9):
        split = "test" if index >= 6 else "train"
        _image(root / f"cars_{split}" / f"{index + 1:05d}.jpg")
        rows[split].append((f"{index + 1:05d}.jpg", index % 3 + 1))
    savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": _car_annotations(rows["train"])})
    savemat(root / "cars_test_annos_withlabels.mat", {"annotations": _car_annotations(rows["test"])})
    return names, 6, 3


def _cars_all_in_one(root: Path, monkeypatch) -> tuple:
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012"]
    table = np.concatenate([_car_annotations([(f"car_ims/{i:06d}.jpg", i % 2 + 1) for i in images], "relative_im_path",
                                             test=int(test)) for images, test in ((range(1, 5), 0), (range(5, 7), 1))],
                           axis=1)
    for index in range(1, 7):
        _image(root / "car_ims" / f"{index:06d}.jpg")
    savemat(root / "cars_annos.mat", {"annotations": table, "class_names": _cell(names)})
    return names, 4, 2


def _dtd(root: Path, monkeypatch) -> tuple:
    classes, lists = ["banded", "blotchy", "zigzagged"], {"train": [], "val": [], "test": []}
    for name in classes:
        for index, split in enumerate(lists):
            _image(root / "dtd" / "images" / name / f"{name}_{index:04d}.jpg")
            lists[split].append(f"{name}/{name}_{index:04d}.jpg")
    for split, lines in lists.items():
        _text(root / "dtd" / "labels" / f"{split}1.txt", lines)
    _text(root / "dtd" / "labels" / "test2.txt", lists["train"])  # other splits are ignored
    return classes, 6, 3


def _flowers(root: Path, monkeypatch) -> tuple:
    for index in range(1, 10):
        _image(root / "jpg" / f"image_{index:05d}.jpg")
    savemat(root / "imagelabels.mat", {"labels": np.array([[1, 2, 3] * 3])})
    savemat(root / "setid.mat", {"trnid": np.array([[1, 2, 3]]), "valid": np.array([[4, 5, 6]]),
                                 "tstid": np.array([[7, 8, 9]])})
    return ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"], 6, 3


def _food(root: Path, monkeypatch) -> tuple:
    base, classes = root / "food-101", ["apple_pie", "baby_back_ribs", "ceviche"]
    lists = {"train": [], "test": []}
    for name in classes:
        for index in range(3):
            _image(base / "images" / name / f"{100 + index}.jpg")
            lists["test" if index == 2 else "train"].append(f"{name}/{100 + index}")
    _text(base / "meta" / "classes.txt", classes)
    _text(base / "meta" / "labels.txt", ["Apple pie", "Baby back ribs", "Ceviche"])
    for split, lines in lists.items():
        _text(base / "meta" / f"{split}.txt", lines)
    return ["Apple pie", "Baby back ribs", "Ceviche"], 6, 3


def _pets(root: Path, monkeypatch) -> tuple:
    lists = {"trainval": [], "test": []}
    for label, breed in enumerate(("Abyssinian", "american_bulldog", "japanese_chin"), 1):
        for index in range(1, 4):
            _image(root / "images" / f"{breed}_{index}.jpg")
            lists["test" if index == 3 else "trainval"].append(f"{breed}_{index} {label} {1 + (label > 1)} 1")
    for split, lines in lists.items():
        _text(root / "annotations" / f"{split}.txt", lines)
    return ["Abyssinian", "American Bulldog", "Japanese Chin"], 6, 3


def _sun397(root: Path, monkeypatch) -> tuple:
    classes, lists = ["/a/abbey", "/a/apartment_building/outdoor", "/b/bakery/shop"], {"Training": [], "Testing": []}
    for name in classes:
        for index in range(3):
            _image(root / "SUN397" / name.lstrip("/") / f"sun_{index}.jpg")
            lists["Testing" if index == 2 else "Training"].append(f"{name}/sun_{index}.jpg")
    _text(root / "Partitions" / "ClassName.txt", classes)
    for split, lines in lists.items():
        _text(root / "Partitions" / f"{split}_01.txt", lines)
    return ["abbey", "apartment building (outdoor)", "bakery (shop)"], 6, 3


OFFICIAL = {"aircraft": _aircraft, "birdsnap": _birdsnap, "caltech101": _caltech101, "caltech256": _caltech256,
            "stanford_cars": _cars, "stanford_cars/all-in-one": _cars_all_in_one, "dtd": _dtd, "flowers102": _flowers,
            "food101": _food, "pets": _pets, "sun397": _sun397}


def _check(data, name: str, classes: list[str], train: int, test: int) -> None:
    assert data.class_names == classes and data.num_classes == len(classes)
    assert len(data.train) + len(data.val) == train and len(data.test) == test
    assert data.metric == ("mean_per_class" if name in MEAN_PER_CLASS else "top1")
    assert data.default_augment == "resized-crop-flip"
    assert data.image_size == 16 and data.in_channels == 3
    assert set(data.test.labels.tolist()) == set(range(len(classes)))


def test_all_twelve_paper_datasets_are_registered():
    assert set(NAMES) | {"cifar10", "cifar100"} <= set(list_datasets())


@pytest.mark.parametrize("layout", list(OFFICIAL))
def test_official_layout(tmp_path, monkeypatch, layout):
    name = layout.split("/")[0]
    classes, train, test = OFFICIAL[layout](tmp_path, monkeypatch)
    _check(load_dataset(name, tmp_path, image_size=16), name, classes, train, test)


@pytest.mark.parametrize(("name", "inner"), [
    ("aircraft", "fgvc-aircraft-2013b"), ("aircraft", "fgvc-aircraft-2013b/data"),
    ("caltech101", "caltech-101/101_ObjectCategories"), ("sun397", "SUN397")])
def test_the_extracted_folder_itself_is_accepted(tmp_path, monkeypatch, name, inner):
    classes, train, test = OFFICIAL[name](tmp_path, monkeypatch)
    _check(load_dataset(name, tmp_path / inner, image_size=16), name, classes, train, test)


def test_caltech_split_draws_n_per_class_with_a_fixed_seed(tmp_path, monkeypatch):
    _caltech101(tmp_path, monkeypatch)
    first, second = (load_dataset("caltech101", tmp_path, image_size=16, seed=seed) for seed in (0, 1))
    assert not {"BACKGROUND_Google", "BACKGROUND Google"} & set(first.class_names)
    train_labels = torch.cat([first.train.labels, first.val.labels])
    assert torch.bincount(train_labels).tolist() == [2, 2, 2]
    assert torch.equal(first.test.images, second.test.images)  # the test split ignores the run's seed
    monkeypatch.setattr(sets_official, "CALTECH101_TRAIN_PER_CLASS", 1)
    assert len(load_dataset("caltech101", tmp_path, image_size=16).test) == 9


def test_listed_but_missing_files_and_corrupt_files_are_skipped_and_counted(tmp_path, monkeypatch, caplog):
    _birdsnap(tmp_path, monkeypatch)
    (tmp_path / "birdsnap" / "download" / "images" / "AF" / "0.jpg").write_bytes(b"not a jpeg")
    with caplog.at_level(logging.WARNING):
        data = load_dataset("birdsnap", tmp_path, image_size=16)
    assert len(data.train) + len(data.val) == 5
    assert "1 of 7 listed image(s) are not on disk" in caplog.text and "skipped 1 file(s)" in caplog.text


def test_official_held_out_images_are_torchvisions_test_transform_of_the_files(tmp_path, monkeypatch):
    from torchvision import transforms

    from robust_transfer.data import folder

    _food(tmp_path, monkeypatch)  # 10 x 12 noise: any resampling beyond the one from the file would show
    size = 14
    paper = transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size),
                                transforms.PILToTensor()])
    eager = load_dataset("food101", tmp_path, image_size=size)
    monkeypatch.setattr(folder, "IN_MEMORY_LIMIT_BYTES", 0)
    lazy = load_dataset("food101", tmp_path, image_size=size)
    for split in (eager.test, eager.val, lazy.test, lazy.val):  # val: held out of train, decoded again
        assert len(split) and len(split.paths) == len(split)
        for index, path in enumerate(split.paths):
            with Image.open(path) as image:
                expected = paper(image.convert("RGB")).float() / 255
            assert torch.equal(split[index][0], expected), path


@pytest.mark.parametrize("name", NAMES)
def test_prepared_layout(tmp_path, name):
    for split, count in (("train", 3), ("test", 1)):
        for label in ("cat", "dog"):
            for index in range(count):
                _image(tmp_path / split / label / f"{index}.jpg")
    data = load_dataset(name, tmp_path, image_size=16)
    assert data.class_names == ["cat", "dog"] and len(data.train) + len(data.val) == 6 and len(data.test) == 2


def test_prepared_layout_keeps_its_own_val_split(tmp_path):
    for split in ("train", "val", "test"):
        for label in ("cat", "dog"):
            _image(tmp_path / split / label / "0.jpg")
    data = load_dataset("dtd", tmp_path, image_size=16)
    assert (len(data.train), len(data.val), len(data.test)) == (2, 2, 2)


KEY_FILES = {"aircraft": "images_variant_test.txt", "birdsnap": "test_images.txt", "caltech101": "101_ObjectCategories",
             "caltech256": "256_ObjectCategories", "stanford_cars": "cars_annos.mat", "dtd": "test1.txt",
             "flowers102": "setid.mat", "food101": "meta/classes.txt", "pets": "annotations/trainval.txt",
             "sun397": "Training_01.txt"}


@pytest.mark.parametrize("name", NAMES)
def test_unknown_folder_names_both_layouts_and_what_is_there(tmp_path, name):
    (tmp_path / "stray.txt").write_text("x")
    (tmp_path / "train").mkdir()  # train/ alone is not the prepared layout
    with pytest.raises(RobustTransferError) as error:
        load_dataset(name, tmp_path, image_size=16)
    message = str(error.value)
    for part in (name, str(tmp_path), KEY_FILES[name], "train/<class>", "test/<class>", "stray.txt"):
        assert part in message


def test_default_root_is_data_home(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "DATA_HOME", tmp_path)
    with pytest.raises(RobustTransferError, match=r"default place.*does not exist"):
        load_dataset("dtd", image_size=16)
    classes, train, test = _dtd(tmp_path / "dtd", monkeypatch)
    _check(load_dataset("dtd", image_size=16), "dtd", classes, train, test)


def _unknown_variant(root: Path) -> None:
    _text(root / "fgvc-aircraft-2013b" / "data" / "images_variant_test.txt", ["1000000 747-400"])


def _no_test_labels(root: Path) -> None:
    (root / "cars_test_annos_withlabels.mat").unlink()


def _not_a_mat_file(root: Path) -> None:
    (root / "setid.mat").write_bytes(b"garbage")


def _no_images(root: Path) -> None:
    for path in (root / "food-101" / "images").rglob("*.jpg"):
        path.unlink()


def _bad_header(root: Path) -> None:
    _text(root / "birdsnap" / "species.txt", ["1\tAbert's Towhee"])


@pytest.mark.parametrize(("name", "break_it", "message"), [
    ("aircraft", _unknown_variant, "unknown variant '747-400'"),
    ("stanford_cars", _no_test_labels, "lacks cars_test_annos_withlabels.mat"),
    ("flowers102", _not_a_mat_file, "cannot read .*setid.mat"),
    ("food101", _no_images, "none of the 6 train image"),
    ("birdsnap", _bad_header, "species.txt lacks the header column"),
])
def test_malformed_official_layouts_are_clear_errors(tmp_path, monkeypatch, name, break_it, message):
    OFFICIAL[name](tmp_path, monkeypatch)
    break_it(tmp_path)
    with pytest.raises(RobustTransferError, match=rf"{message}.*\(official layout: "):
        load_dataset(name, tmp_path, image_size=16)
