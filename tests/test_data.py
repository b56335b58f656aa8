"""Datasets: the embedded sets, every on-disk layout (generated here), splits and batches."""

from __future__ import annotations

import gzip
import logging
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from robust_transfer import RobustTransferError
from robust_transfer.data import InMemoryDataset, list_datasets, load_dataset, make_batches


@pytest.mark.parametrize("name,size,channels", [("fashion-mnist", 28, 1), ("animal-mnist", 28, 1),
                                                ("mnist-5k", 28, 1), ("digits", 8, 1)])
def test_embedded_datasets_load_with_disjoint_deterministic_splits(name, size, channels):
    data = load_dataset(name, seed=3)
    assert data.num_classes == 10 and data.in_channels == channels and data.image_size == size
    x, y = data.train[0]
    assert x.dtype == torch.float32 and x.shape == (channels, size, size) and 0 <= x.min() <= x.max() <= 1
    assert 0 <= y < 10 and 0 < data.mean[0] < 1 and 0 < data.std[0] < 1
    again = load_dataset(name, seed=3)
    assert torch.equal(data.val.images, again.val.images) and torch.equal(data.test.labels, again.test.labels)
    other = load_dataset(name, seed=4)
    if name != "fashion-mnist":  # its test split is the official one, whatever the seed
        assert not torch.equal(data.test.images, other.test.images)
    assert not torch.equal(data.val.images, other.val.images)
    # Stratified: every class appears in every split.
    for split in (data.train, data.val, data.test):
        assert len(torch.unique(split.labels)) == 10


def test_splits_do_not_overlap():
    data = load_dataset("digits", seed=0)

    def rows(split):
        pairs = zip(split.images, split.labels, strict=True)
        return {tuple(img.flatten().tolist()) + (int(lbl),) for img, lbl in pairs}

    train, val, test = rows(data.train), rows(data.val), rows(data.test)
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    # digits has a few exact duplicates, so compare counts of shared rows with a small allowance.
    assert len(train & test) < 10 and len(train & val) < 10


def test_image_size_and_channels_conversion():
    data = load_dataset("digits", image_size=16, in_channels=3)
    assert data.in_channels == 3 and data.image_size == 16 and data.train.images.shape[1:] == (3, 16, 16)
    assert len(data.mean) == 3


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(RobustTransferError) as error:
        load_dataset("imagenet-21k")
    assert all(name in str(error.value) for name in list_datasets())


def test_missing_fashion_mnist_says_where_and_how(tmp_path):
    with pytest.raises(RobustTransferError, match=rf"{tmp_path}.*apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path)


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path.with_suffix(".gz") if compress else path, "wb").write(data)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_folder(tmp_path, compress):
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 40), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)), compress)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 4, compress)
    data = load_dataset("idx", tmp_path)
    assert data.num_classes == 4 and len(data.test) == 10 and len(data.train) + len(data.val) == 40


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (8, 28, 28)), False)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(8) % 2, False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(RobustTransferError, match="truncated"):
        load_dataset("idx", tmp_path)


def _cifar_folder(root: Path, hundred: bool) -> Path:
    rng = np.random.default_rng(0)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir()
    label_key = b"fine_labels" if hundred else b"labels"
    files = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in files:
        batch = {b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), label_key: [0, 1, 2, 0, 1, 2]}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {b"fine_label_names" if hundred else b"label_names": [b"a", b"b", b"c"]}
    (folder / ("meta" if hundred else "batches.meta")).write_bytes(pickle.dumps(meta))
    return folder


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_pickle_layouts(tmp_path, hundred):
    _cifar_folder(tmp_path, hundred)
    data = load_dataset("cifar100" if hundred else "cifar10", tmp_path)
    assert data.class_names == ["a", "b", "c"] and data.in_channels == 3 and data.image_size == 32
    assert len(data.test) == 6


class _Payload:
    def __reduce__(self):
        return (Path.write_text, (Path(_Payload.target), "payload ran"))


def test_malicious_cifar_pickle_is_refused_and_its_payload_does_not_run(tmp_path):
    folder = _cifar_folder(tmp_path, hundred=False)
    marker = tmp_path / "pwned"
    _Payload.target = str(marker)
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": _Payload(), b"labels": [0]}))
    with pytest.raises(RobustTransferError, match="not a plain data pickle"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_missing_cifar_names_the_expected_files(tmp_path):
    with pytest.raises(RobustTransferError, match="data_batch_1.*test_batch"):
        load_dataset("cifar10", tmp_path)


def _save(path: Path, image: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _folder_dataset(root: Path, splits=("train", "test")) -> None:
    rng = np.random.default_rng(0)
    for split in splits:
        for label in ("cat", "dog"):
            for i in range(4):
                pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
                _save(root / split / label / f"{i}.jpg", Image.fromarray(pixels))


def test_image_folder_converts_every_mode_and_skips_bad_files(tmp_path, caplog):
    _folder_dataset(tmp_path)
    odd = tmp_path / "train" / "cat"
    _save(odd / "rgba.png", Image.new("RGBA", (12, 9), (255, 0, 0, 128)))
    _save(odd / "palette.png", Image.new("P", (12, 9), 3))
    _save(odd / "cmyk.jpg", Image.new("CMYK", (12, 9), (0, 255, 0, 0)))
    _save(odd / "gray16.png", Image.fromarray(np.full((9, 12), 60000, dtype=np.uint16)))
    (odd / "truncated.jpg").write_bytes((odd / "0.jpg").read_bytes()[:60])
    (odd / "not-an-image.png").write_text("hello")
    (tmp_path / "train" / "empty").mkdir()
    with caplog.at_level(logging.WARNING):
        data = load_dataset("imagefolder", tmp_path, image_size=16)
    assert data.class_names == ["cat", "dog"] and data.image_size == 16 and data.in_channels == 3
    assert len(data.train) + len(data.val) == 12  # 8 plain + 4 odd modes; 2 bad files skipped
    assert "skipped 2 file(s)" in caplog.text and "empty class folder" in caplog.text
    # The 16-bit image was scaled (60000/65535 of white), not clipped to white.
    brightness = torch.cat([data.train.images, data.val.images]).float().mean((1, 2, 3))
    assert ((brightness > 200) & (brightness < 250)).sum() == 1


def test_image_folder_with_val_and_test(tmp_path):
    _folder_dataset(tmp_path, ("train", "val", "test"))
    data = load_dataset("imagefolder", tmp_path, image_size=8, in_channels=1)
    assert len(data.train) == 8 and len(data.val) == 8 and len(data.test) == 8 and data.in_channels == 1


@pytest.mark.parametrize("problem,message", [
    ("one-class", "needs at least 2"),
    ("unknown-test-class", "train/ lacks: bird"),
    ("no-test", "neither val/ nor test/"),
    ("no-train", "expected root/train"),
])
def test_image_folder_layout_errors(tmp_path, problem, message):
    _folder_dataset(tmp_path)
    if problem == "one-class":
        for path in (tmp_path / "train" / "dog").iterdir():
            path.unlink()
    elif problem == "unknown-test-class":
        _save(tmp_path / "test" / "bird" / "0.png", Image.new("RGB", (8, 8)))
    elif problem == "no-test":
        for path in (tmp_path / "test").rglob("*.jpg"):
            path.unlink()
        for folder in sorted((tmp_path / "test").iterdir()):
            folder.rmdir()
        (tmp_path / "test").rmdir()
    else:
        (tmp_path / "train").rename(tmp_path / "training")
    with pytest.raises(RobustTransferError, match=message):
        load_dataset("imagefolder", tmp_path)


def _toy(n: int = 50) -> InMemoryDataset:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 8, 8).contiguous()
    return InMemoryDataset(images, torch.arange(n) % 5, [str(i) for i in range(5)])


@pytest.mark.parametrize("augment", ["none", "crop", "crop-flip"])
def test_two_rank_shards_make_up_the_single_process_batch(augment):
    data = _toy()
    single = list(make_batches(data, 16, shuffle=True, seed=1, epoch=2, augment=augment))
    ranks = [list(make_batches(data, 16, shuffle=True, seed=1, epoch=2, augment=augment, rank=r, world_size=2))
             for r in range(2)]
    for index, (x, y) in enumerate(single):
        x0, y0 = ranks[0][index]
        x1, y1 = ranks[1][index]
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)


def test_batches_are_reproducible_per_epoch_and_differ_between_epochs():
    data = _toy()
    first = [y for _, y in make_batches(data, 10, shuffle=True, seed=0, epoch=0, augment="crop-flip")]
    again = [y for _, y in make_batches(data, 10, shuffle=True, seed=0, epoch=0, augment="crop-flip")]
    later = [y for _, y in make_batches(data, 10, shuffle=True, seed=0, epoch=1, augment="crop-flip")]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, later, strict=True))
    assert len(make_batches(data, 16, shuffle=False, drop_last=True)) == 3
    assert len(make_batches(data, 16, shuffle=False)) == 4


def test_crop_flip_moves_pixels_but_keeps_range_and_shape():
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    data = InMemoryDataset(images, torch.zeros(32, dtype=torch.long), ["x"])
    (x, _), = list(make_batches(data, 32, shuffle=False, augment="crop-flip"))
    assert x.shape == (32, 3, 16, 16) and 0 <= x.min() and x.max() <= 1
    assert not torch.equal(x, images.float() / 255)
    (plain, _), = list(make_batches(data, 32, shuffle=False))
    assert torch.equal(plain, images.float() / 255)
