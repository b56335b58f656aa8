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

# name, image side, train + val size, test size (official test split, or 20% of every class)
EMBEDDED = [("fashion-mnist", 28, 60000, 10000), ("animal-mnist", 28, 8000, 2000),
            ("mnist-5k", 28, 4000, 1000), ("digits", 8, 1438, 359)]


@pytest.mark.parametrize("name,size,train_val,test", EMBEDDED)
def test_embedded_datasets_load_with_disjoint_deterministic_splits(name, size, train_val, test):
    channels = 1
    data = load_dataset(name, seed=3)
    assert data.num_classes == 10 and data.in_channels == channels and data.image_size == size
    assert len(data.class_names) == 10 and data.default_augment in ("crop-flip", "crop", "none")
    assert len(data.train) + len(data.val) == train_val and len(data.test) == test
    assert abs(len(data.val) - 0.1 * train_val) <= 10  # val_fraction 0.1, rounded per class
    for split in (data.train, data.val, data.test):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert split.images.shape[1:] == (channels, size, size)
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


def _cifar_folder(root: Path, hundred: bool, protocol: int = pickle.DEFAULT_PROTOCOL) -> Path:
    rng = np.random.default_rng(0)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir()
    label_key = b"fine_labels" if hundred else b"labels"
    files = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in files:
        batch = {b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), label_key: [0, 1, 2, 0, 1, 2]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {b"fine_label_names" if hundred else b"label_names": [b"a", b"b", b"c"]}
    (folder / ("meta" if hundred else "batches.meta")).write_bytes(pickle.dumps(meta, protocol=protocol))
    return folder


@pytest.mark.parametrize("hundred,protocol", [(False, 2), (False, 5), (True, 2), (True, 5)])
def test_cifar_pickle_layouts(tmp_path, hundred, protocol):
    # Protocol 2 is how the official files spell bytes and arrays; protocol 5 stores arrays via _frombuffer.
    folder = _cifar_folder(tmp_path, hundred, protocol)
    data = load_dataset("cifar100" if hundred else "cifar10", tmp_path)
    assert data.class_names == ["a", "b", "c"] and data.in_channels == 3 and data.image_size == 32
    assert len(data.test) == 6 and len(data.train) + len(data.val) == (6 if hundred else 30)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (3, 32, 32)
    # The folder itself works as root too, and the rows are the pickled bytes in CHW order.
    again = load_dataset("cifar100" if hundred else "cifar10", folder)
    test_file = folder / ("test" if hundred else "test_batch")
    raw = pickle.loads(test_file.read_bytes())[b"data"]
    assert torch.equal(again.test.images, torch.from_numpy(raw).view(-1, 3, 32, 32))


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


def test_each_file_is_decoded_once_train_and_held_out_shares_each_their_own_way(tmp_path, monkeypatch):
    from robust_transfer.data import folder

    _folder_dataset(tmp_path)
    decoded: list[tuple[str, bool]] = []
    original = folder.decode_image

    def counting(path, size, channels, held_out=False):
        decoded.append((str(path.relative_to(tmp_path)), held_out))
        return original(path, size, channels, held_out)

    monkeypatch.setattr(folder, "decode_image", counting)
    data = load_dataset("imagefolder", tmp_path, image_size=16, val_fraction=0.25)
    files = [name for name, _ in decoded]
    assert sorted(files) == sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.jpg"))  # each once
    held_out = {name for name, was_held_out in decoded if was_held_out}
    assert len(data.train) == 6 and len(data.val) == 2 and len(data.test) == 8
    # Validation (2 of train's files) and test the paper's test way, the 6 kept for training the train way.
    assert len([name for name in held_out if name.startswith("train/")]) == 2
    assert len([name for name in held_out if name.startswith("test/")]) == 8
    assert len(decoded) - len(held_out) == 6


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
    ("unknown-val-class", "train/ lacks: bird"),
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
    elif problem == "unknown-val-class":
        _folder_dataset(tmp_path, ("val",))
        _save(tmp_path / "val" / "bird" / "0.png", Image.new("RGB", (8, 8)))
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


@pytest.mark.parametrize("augment", ["none", "crop", "crop-flip", "resized-crop-flip"])
def test_two_rank_shards_make_up_the_single_process_batch(augment):
    data = _toy()
    single = list(make_batches(data, 16, shuffle=True, seed=1, epoch=2, augment=augment))
    ranks = [list(make_batches(data, 16, shuffle=True, seed=1, epoch=2, augment=augment, rank=r,
                               world_size=2)) for r in range(2)]
    for index, (x, y) in enumerate(single):
        x0, y0 = ranks[0][index]
        x1, y1 = ranks[1][index]
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)


def test_batches_are_reproducible_per_epoch_and_differ_between_epochs():
    data = _toy()

    def run(epoch):
        batches = make_batches(data, 10, shuffle=True, seed=0, epoch=epoch, augment="crop-flip")
        return [torch.cat([x.flatten(1), y[:, None].float()], 1) for x, y in batches]

    first, again, later = run(0), run(0), run(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # images and labels alike
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


# ---- splits, statistics and argument checks -------------------------------------------------------------


def test_stratified_split_partitions_every_class_deterministically():
    from robust_transfer.data.splits import stratified_split

    labels = torch.randint(0, 7, (1000,), generator=torch.Generator().manual_seed(0))
    kept, held = stratified_split(labels, 0.2, seed=5)
    assert torch.equal(torch.cat([kept, held]).sort().values, torch.arange(1000))  # disjoint, complete
    for label in range(7):
        count = int((labels == label).sum())
        assert int((labels[held] == label).sum()) == round(0.2 * count)
    again_kept, again_held = stratified_split(labels, 0.2, seed=5)
    assert torch.equal(kept, again_kept) and torch.equal(held, again_held)
    assert not torch.equal(held, stratified_split(labels, 0.2, seed=6)[1])


def test_mean_and_std_are_the_train_split_statistics():
    data = load_dataset("digits", in_channels=3, image_size=12)
    flat = data.train.images.transpose(0, 1).reshape(3, -1).double() / 255
    assert data.mean == pytest.approx(flat.mean(1).tolist(), abs=1e-9)
    assert data.std == pytest.approx(flat.std(1).tolist(), abs=1e-9)
    assert data.train.images.shape[1:] == (3, 12, 12) and data.test.images.shape[1:] == (3, 12, 12)
    gray = load_dataset("digits", in_channels=1)
    assert gray.in_channels == 1 and len(gray.mean) == 1


@pytest.mark.parametrize("kwargs,message", [({"in_channels": 2}, "in_channels must be 1"),
                                            ({"image_size": 0}, "image_size must be"),
                                            ({"val_fraction": 1.0}, "val_fraction")])
def test_bad_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(RobustTransferError, match=message):
        load_dataset("digits", **kwargs)


def test_folder_datasets_need_a_root():
    for name in ("idx", "imagefolder"):
        with pytest.raises(RobustTransferError, match="pass root="):
            load_dataset(name)


# ---- Animal-MNIST files ------------------------------------------------------------------------------


def test_missing_animal_mnist_says_how_to_install(tmp_path):
    with pytest.raises(RobustTransferError, match=r"pip install --no-deps animal-mnist==0.4"):
        load_dataset("animal-mnist", tmp_path)


def test_malicious_animal_mnist_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _Payload.target = str(marker)
    with gzip.open(tmp_path / "animal_data_version_3.gz", "wb") as handle:
        handle.write(pickle.dumps(_Payload()))
    with gzip.open(tmp_path / "animal_label_version_3.gz", "wb") as handle:
        handle.write(pickle.dumps(np.zeros(4, dtype=np.int64)))
    with pytest.raises(RobustTransferError, match="not a plain data pickle.*nothing in it ran"):
        load_dataset("animal-mnist", tmp_path)
    assert not marker.exists()


def test_animal_mnist_from_a_folder_of_its_files(tmp_path):
    rng = np.random.default_rng(0)
    with gzip.open(tmp_path / "animal_data_version_3.gz", "wb") as handle:
        pickle.dump(rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), handle)
    with gzip.open(tmp_path / "animal_label_version_3.gz", "wb") as handle:
        pickle.dump(np.arange(40) % 10, handle)
    data = load_dataset("animal-mnist", tmp_path)
    assert len(data.train) + len(data.val) + len(data.test) == 40 and data.class_names[0] == "bear"


# ---- image folders: more layouts, gray output, lazy decoding --------------------------------------------


def test_image_folder_with_train_and_val_only_uses_val_as_test(tmp_path):
    _folder_dataset(tmp_path, ("train", "val"))
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    _save(tmp_path / "train" / ".ipynb_checkpoints" / "x.png", Image.new("RGB", (8, 8)))
    data = load_dataset("imagefolder", tmp_path, image_size=10, in_channels=1)
    assert data.class_names == ["cat", "dog"] and len(data.test) == 8 and len(data.train) + len(data.val) == 8
    assert len(data.val) == 2  # one per class: at least one is held out of each class
    x, _ = data.test[0]
    assert x.shape == (1, 10, 10) and x.dtype == torch.float32


def test_large_image_folders_are_decoded_lazily_with_the_same_batches(tmp_path, monkeypatch):
    from robust_transfer.data import folder

    _folder_dataset(tmp_path, ("train", "val", "test"))
    eager = load_dataset("imagefolder", tmp_path, image_size=12)
    monkeypatch.setattr(folder, "IN_MEMORY_LIMIT_BYTES", 0)
    lazy = load_dataset("imagefolder", tmp_path, image_size=12)
    assert isinstance(lazy.train, folder.FolderDataset) and not isinstance(lazy.train, InMemoryDataset)
    assert lazy.mean == pytest.approx(eager.mean, abs=1e-6) and lazy.std == pytest.approx(eager.std, abs=1e-6)
    for rank in range(2):
        kwargs = dict(shuffle=True, seed=4, epoch=1, augment="crop-flip", rank=rank, world_size=2)
        expected = list(make_batches(eager.train, 3, **kwargs))
        got = list(make_batches(lazy.train, 3, num_workers=1 if rank else 0, **kwargs))
        assert len(got) == len(expected) == 3
        for (x, y), (ex, ey) in zip(got, expected, strict=True):
            assert torch.equal(y, ey) and torch.allclose(x, ex, atol=1e-6) and x.is_contiguous()


def test_lazy_folder_names_a_file_that_does_not_decode(tmp_path, monkeypatch):
    from robust_transfer.data import folder

    _folder_dataset(tmp_path)
    (tmp_path / "train" / "cat" / "0.jpg").write_text("not a jpeg")
    monkeypatch.setattr(folder, "IN_MEMORY_LIMIT_BYTES", 0)
    data = folder.load_image_folder(tmp_path, 8, 3)[0].decode()
    with pytest.raises(RobustTransferError, match=r"0\.jpg"):
        data[0]


# ---- batches -------------------------------------------------------------------------------------------


class _Items(torch.utils.data.Dataset):
    """A dataset without the in-memory fast path: items one by one, as a DataLoader sees them."""

    def __init__(self, inner: InMemoryDataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int):
        return self.inner[index]


def test_order_is_the_documented_permutation():
    names = [str(i) for i in range(40)]
    data = InMemoryDataset(torch.zeros(40, 1, 4, 4, dtype=torch.uint8), torch.arange(40), names)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(7 * 1_000_003 + 3))
    labels = torch.cat([y for _, y in make_batches(data, 16, shuffle=True, seed=7, epoch=3)])
    assert torch.equal(labels, order)
    assert torch.equal(torch.cat([y for _, y in make_batches(data, 16, shuffle=False)]), torch.arange(40))
    other_seed = torch.cat([y for _, y in make_batches(data, 16, shuffle=True, seed=8, epoch=3)])
    assert not torch.equal(labels, other_seed)


@pytest.mark.parametrize("augment", ["none", "crop-flip", "resized-crop-flip"])
def test_three_uneven_shards_match_one_process_on_both_paths(augment):
    data = _toy(50)  # batches of 16, 16, 16, 2: ranks 2's share of the last one is empty
    kwargs = dict(shuffle=True, seed=3, epoch=5, augment=augment)
    single = list(make_batches(data, 16, **kwargs))
    for source in (data, _Items(data)):
        shards = [list(make_batches(source, 16, rank=r, world_size=3, **kwargs)) for r in range(3)]
        assert all(len(shard) == len(single) == 4 for shard in shards)
        for index, (x, y) in enumerate(single):
            for rank in range(3):
                xr, yr = shards[rank][index]
                assert torch.allclose(xr, x[rank::3], atol=1e-6) and torch.equal(yr, y[rank::3])
                assert xr.dtype == torch.float32 and yr.dtype == torch.int64
    assert shards[2][-1][0].shape == (0, 1, 8, 8)


def test_crop_is_a_shift_within_zero_padding_of_an_eighth():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (24, 2, 28, 28), dtype=torch.uint8, generator=generator)
    data = InMemoryDataset(images, torch.zeros(24, dtype=torch.long), ["x"])
    (x, _), = list(make_batches(data, 24, shuffle=False, augment="crop-flip", seed=1))
    pad = 28 // 8
    padded = torch.nn.functional.pad(images.float() / 255, (pad, pad, pad, pad))
    flipped_any = False
    for i in range(24):
        shifts = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
        crops = [(dy, dx, flip, padded[i, :, dy:dy + 28, dx:dx + 28])
                 for dy, dx in shifts for flip in (False, True)]
        matches = [(dy, dx, flip) for dy, dx, flip, crop in crops
                   if torch.equal(x[i], crop.flip(-1) if flip else crop)]
        assert matches, f"image {i} is not a padded shift (and flip) of its original"
        flipped_any |= any(flip for _, _, flip in matches)
    assert flipped_any
    (crop_only, _), = list(make_batches(data, 24, shuffle=False, augment="crop", seed=1))
    assert crop_only.shape == x.shape


def test_unknown_augmentation_is_a_clear_error():
    with pytest.raises(RobustTransferError, match="crop-flip"):
        make_batches(_toy(), 8, shuffle=False, augment="mixup")
