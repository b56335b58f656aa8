"""ImageNet's real layouts and the streamed training crops, on small ILSVRC-layout folders of real photographs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from scipy.stats import ks_2samp
from torchvision.transforms import v2

from robust_transfer import RobustTransferError, evaluate, transfer
from robust_transfer.cli import main
from robust_transfer.data import folder, imagenet, load_dataset, make_batches
from robust_transfer.data.decode import read_original
from robust_transfer.data.folder import FolderDataset
from robust_transfer.data.imagenet import DEVKIT
from robust_transfer.data.photo_sample import SAMPLE_SYNSETS, write_imagenet_sample
from robust_transfer.data.streaming import StreamedCrops
from robust_transfer.models import create_model, load_model
from tests.processes import kill_after_first_checkpoint

SMALL = dict(train_per_class=10, val_per_class=4, size=(64, 48))


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_imagenet_sample(tmp_path_factory.mktemp("ilsvrc") / "imagenet", **SMALL)


def _labels_by_file(split) -> dict[str, int]:
    return {path.name: int(label) for path, label in zip(split.paths, split.labels, strict=True)}


def test_every_val_layout_gives_the_same_labels_and_names(tmp_path, sample):
    reference = load_dataset("imagenet", sample, image_size=32)
    assert reference.class_names == ["tench", "goldfish", "great white shark"]
    assert reference.num_classes == 3 and len(reference.test) == 12 and reference.image_size == 32
    expected = _labels_by_file(reference.test)
    # Each val image is a crop of its class's photograph: the label must be the synset the file says it is.
    solution = dict(line.split(",") for line in (sample / "LOC_val_solution.csv").read_text().splitlines()[1:])
    synsets = [synset for synset, _, _ in SAMPLE_SYNSETS]
    assert {name: synsets[label] for name, label in expected.items()} == {
        f"{stem}.JPEG": value.split()[0] for stem, value in solution.items()}

    devkit = write_imagenet_sample(tmp_path / "devkit", **SMALL, val_labels="devkit")
    packed = tmp_path / "packed"
    shutil.copytree(devkit, packed)
    with tarfile.open(packed / f"{DEVKIT}.tar.gz", "w:gz") as archive:
        archive.add(packed / DEVKIT, arcname=DEVKIT)
    shutil.rmtree(packed / DEVKIT)
    kaggle = tmp_path / "kaggle"  # the Kaggle archive: ILSVRC/Data/CLS-LOC/{train,val}, the CSVs at its root
    (kaggle / "ILSVRC" / "Data").mkdir(parents=True)
    shutil.copytree(sample, kaggle / "ILSVRC" / "Data" / "CLS-LOC", ignore=shutil.ignore_patterns("*.csv", "*.txt"))
    for name in ("LOC_val_solution.csv", "LOC_synset_mapping.txt"):
        shutil.copy(sample / name, kaggle / name)
    for root in (devkit, packed, kaggle, kaggle / "ILSVRC" / "Data" / "CLS-LOC"):
        data = load_dataset("imagenet", root, image_size=32)
        assert data.class_names == reference.class_names, root
        assert _labels_by_file(data.test) == expected, root
        assert torch.equal(data.test.images, reference.test.images), root

    sorted_val = write_imagenet_sample(tmp_path / "sorted", **SMALL, val_labels="sorted")
    data = load_dataset("imagenet", sorted_val, image_size=32)
    assert data.class_names == synsets  # no name list beside it: the synsets themselves
    assert _labels_by_file(data.test) == expected


def _broken(tmp_path, sample, name: str):
    root = tmp_path / name
    shutil.copytree(sample, root)
    return root


@pytest.mark.parametrize("breakage, message", [
    ("no labels", "nothing labels them"),
    ("unknown synset", "with synset n09999999, which train/ lacks"),
    ("unlabelled image", "has no label for"),
    ("not a synset", "not named by a WordNet synset"),
    ("no train", "is not an ImageNet folder"),
])
def test_bad_layouts_are_one_line_errors(tmp_path, sample, capsys, breakage, message):
    root = _broken(tmp_path, sample, breakage.replace(" ", "-"))
    solution = root / "LOC_val_solution.csv"
    if breakage == "no labels":
        solution.unlink()
    elif breakage == "unknown synset":
        lines = solution.read_text().splitlines()
        stem = lines[1].split(",")[0]
        solution.write_text("\n".join([lines[0], f"{stem},n09999999 0 0 10 10", *lines[2:]]) + "\n")
    elif breakage == "unlabelled image":
        shutil.copy(next((root / "val").iterdir()), root / "val" / "holiday.JPEG")
    elif breakage == "not a synset":
        (root / "train" / "n01440764").rename(root / "train" / "tench")
    else:
        shutil.rmtree(root / "train")
    code = main(["pretrain", "--dataset", "imagenet", "--data-root", str(root), "--out-dir", str(tmp_path / "run"),
                 "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_imagenet_needs_its_folder():
    with pytest.raises(RobustTransferError, match="needs its folder"):
        load_dataset("imagenet")


def _wide_image(path) -> None:
    """200 x 50: a red left eighth, the rest blue. A centre square never shows red; crops of the original do."""
    array = np.zeros((50, 200, 3), dtype=np.uint8)
    array[:, :25, 0] = 255
    array[:, 25:, 2] = 255
    Image.fromarray(array).save(path, quality=95)


def test_streamed_crops_come_from_the_whole_original_image(tmp_path):
    paths = []
    for i in range(8):
        _wide_image(tmp_path / f"{i}.jpg")
        paths.append(tmp_path / f"{i}.jpg")
    files = FolderDataset(paths, [0, 1] * 4, ["a", "b"], 16, 3)
    assert files[0][0][0].max() < 0.2  # the centre-square decode: no red at all
    batches = [x for epoch in range(8) for x, _ in make_batches(files, 8, shuffle=True, epoch=epoch, seed=1,
                                                                 augment="resized-crop-flip")]
    red = torch.cat(batches)[:, 0] > 0.8  # [N, 16, 16]
    assert red.any(), "no crop reached the left edge of the original image"
    on_left, on_right = red[..., :4].flatten(1).any(1), red[..., -4:].flatten(1).any(1)
    assert (on_left & ~on_right).any() and (on_right & ~on_left).any()  # the red edge as it was, and flipped


def test_streamed_batches_depend_on_seed_epoch_and_row_only(tmp_path, sample):
    data = load_dataset("imagenet", sample, image_size=24)

    def epoch(epoch: int, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(make_batches(data.train, 7, shuffle=True, seed=5, epoch=epoch, augment="resized-crop-flip",
                                 drop_last=True, **kwargs))

    single = epoch(0)
    assert [tuple(x.shape) for x, _ in single] == [(7, 3, 24, 24)] * (len(data.train) // 7)
    assert all(x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 for x, _ in single)
    workers = epoch(0, num_workers=2)
    assert all(torch.equal(a, b) and torch.equal(ya, yb) for (a, ya), (b, yb) in zip(single, workers, strict=True))
    ranks = [epoch(0, rank=r, world_size=2) for r in range(2)]
    for index, (x, y) in enumerate(single):
        assert torch.equal(ranks[0][index][0], x[0::2]) and torch.equal(ranks[1][index][0], x[1::2])
        assert torch.equal(ranks[1][index][1], y[1::2])
    assert not torch.equal(epoch(1)[0][0], single[0][0])
    # 27 examples in batches of 13: the last global batch has one row, so rank 1's share of it is empty.
    last = [list(make_batches(data.train, 13, shuffle=True, augment="resized-crop-flip", rank=r, world_size=2))[-1]
            for r in range(2)]
    assert len(data.train) == 27 and [len(x) for x, _ in last] == [1, 0] and last[1][0].shape[1:] == (3, 24, 24)
    state = torch.get_rng_state()
    epoch(0, num_workers=1)
    assert torch.equal(torch.get_rng_state(), state), "loading a streamed epoch moved the training run's generator"


def test_crop_scale_ratio_and_flip_match_torchvision(tmp_path):
    # ImageNet's typical 500 x 375: RandomResizedCrop's rejection of boxes wider or taller than the image depends on
    # which side is which, so a crop drawn for the transposed size would change the distributions.
    crops = StreamedCrops([], torch.empty(0, dtype=torch.long), [], 224, 3)
    draws = [crops.crop_box(seed, 375, 500) for seed in range(3000)]
    ours = np.array([(box["height"] * box["width"] / (375 * 500), np.log(box["width"] / box["height"]))
                     for box, _ in draws])
    reference_crop = v2.RandomResizedCrop(224, antialias=True)
    torch.manual_seed(123)
    image = torch.empty(3, 375, 500, dtype=torch.uint8)
    boxes = [reference_crop.make_params([image]) for _ in range(3000)]
    theirs = np.array([(b["height"] * b["width"] / (375 * 500), np.log(b["width"] / b["height"])) for b in boxes])
    assert ks_2samp(ours[:, 0], theirs[:, 0]).pvalue > 1e-3  # crop scale
    assert ks_2samp(ours[:, 1], theirs[:, 1]).pvalue > 1e-3  # crop aspect ratio
    assert 0.45 < np.mean([flip for _, flip in draws]) < 0.55
    assert all(b["top"] + b["height"] <= 375 and b["left"] + b["width"] <= 500 for b, _ in draws)


TINY_RUN = ["--dataset", "imagenet", "--image-size", "32", "--arch", "small_resnet", "--method", "pgd", "--eps", "0.5",
            "--attack-steps", "1", "--epochs", "3", "--batch-size", "9", "--eval-examples", "3", "--eval-steps", "1",
            "--test-steps", "2", "--precision", "fp32", "--num-workers", "1", "--no-progress"]


def _pretrain(launcher: list[str], sample, out_dir, *extra: str) -> list[str]:
    return [*launcher, "-m", "robust_transfer", "pretrain", *TINY_RUN, "--data-root", str(sample), "--out-dir",
            str(out_dir), *extra]


LAUNCHERS = {
    "1 process": [sys.executable],
    "2 processes": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
}


@pytest.mark.skipif(os.cpu_count() < 2, reason="needs two cores for two processes")
@pytest.mark.parametrize("processes", LAUNCHERS)
def test_imagenet_pretraining_resumes_exactly_after_sigkill_and_evaluates(tmp_path, sample, capsys, processes):
    launcher = LAUNCHERS[processes]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    reference = subprocess.run(_pretrain(launcher, sample, tmp_path / "reference"), capture_output=True, text=True,
                               env=env, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    resumed_dir = tmp_path / "resumed"
    kill_after_first_checkpoint(_pretrain(launcher, sample, resumed_dir), resumed_dir / "checkpoint.pt", 3, env)
    resumed = subprocess.run(_pretrain(launcher, sample, resumed_dir, "--resume"), capture_output=True, text=True,
                             env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = load_model(tmp_path / "reference" / "model.safetensors")
    actual = load_model(resumed_dir / "model.safetensors")
    assert [k for k, v in expected.state_dict().items() if not torch.equal(v, actual.state_dict()[k])] == []
    assert actual.metadata["input_size"] == 32 and actual.metadata["recipe"]["image_size"] == 32
    results = json.loads((resumed_dir / "results.json").read_text())
    assert [entry["epoch"] for entry in results["history"]] == [1, 2, 3]

    # The model file evaluates on the val/ it was tested on, at the size it was trained at.
    assert main(["evaluate", str(resumed_dir / "model.safetensors"), "--dataset", "imagenet", "--data-root",
                 str(sample), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["n"] == 12 and record["clean_acc"] == results["test"]["clean_acc"]


def test_a_set_larger_than_memory_fine_tunes_on_streamed_crops_and_refits_on_train_plus_val(tmp_path, sample,
                                                                                             monkeypatch):
    # As SUN397 or Food-101 at 224 px: nothing decoded up front, every training crop taken from its file.
    monkeypatch.setattr(folder, "IN_MEMORY_LIMIT_BYTES", 0)
    data = load_dataset("imagenet", sample, image_size=32)
    assert isinstance(data.train, FolderDataset) and isinstance(data.test, FolderDataset)
    streamed = []
    crop = StreamedCrops.__getitem__
    monkeypatch.setattr(StreamedCrops, "__getitem__", lambda self, key: streamed.append(key[0]) or crop(self, key))
    source = create_model("small_resnet", num_classes=10, in_channels=3, image_size=32)
    result = transfer(model=source, dataset="imagenet", data_root=str(sample), mode="full", epochs=1, lrs=[0.01],
                      batch_size=9, precision="fp32", num_workers=0, out_dir=str(tmp_path / "run"), progress=False)
    assert result.record.selection.chosen == 0.01 and 0 <= result.record.test_score <= 1
    # One epoch on train (27 of 30 after validation: 3 batches of 9), then the refit on train + val (30: 3 batches).
    assert len(streamed) == 3 * 9 + 3 * 9
    assert max(streamed[27:]) >= 27  # the refit streams validation's files too (train's are 0-26)
    # Its test split, decoded item by item in loader workers, scores as the same images decoded into memory.
    lazily = evaluate(result.model, data.test, precision="fp32")
    monkeypatch.setattr(folder, "IN_MEMORY_LIMIT_BYTES", 2**30)
    in_memory = load_dataset("imagenet", sample, image_size=32).test
    assert not isinstance(in_memory, FolderDataset)
    assert lazily.n == 12 and lazily.clean_acc == evaluate(result.model, in_memory, precision="fp32").clean_acc


def test_odd_jpegs_decode_as_pil_decodes_them_and_a_broken_one_is_named(tmp_path):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    rotated = Image.Exif()
    rotated[0x0112] = 6  # "rotate 90": the decoded image is 40 x 30
    image.save(tmp_path / "plain.jpg")
    image.save(tmp_path / "rotated.jpg", exif=rotated)
    image.convert("CMYK").save(tmp_path / "cmyk.jpg")
    image.convert("L").save(tmp_path / "gray.jpg")
    image.save(tmp_path / "png.jpg", format="PNG")  # ImageNet has a PNG named .JPEG
    for name in ("plain", "rotated", "cmyk", "gray", "png"):
        path = tmp_path / f"{name}.jpg"
        with Image.open(path) as pil:
            expected = torch.from_numpy(np.array(ImageOps.exif_transpose(pil).convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(read_original(path, 3), expected), name
    assert read_original(tmp_path / "rotated.jpg", 3).shape == (3, 40, 30)
    (tmp_path / "broken.jpg").write_bytes((tmp_path / "plain.jpg").read_bytes()[:200])
    crops = StreamedCrops([tmp_path / "plain.jpg", tmp_path / "broken.jpg"], torch.tensor([0, 1]), ["a", "b"], 16, 3)
    assert crops[(0, 7)][0].shape == (3, 16, 16)
    with pytest.raises(RobustTransferError, match="cannot decode .*broken.jpg"):
        crops[(1, 7)]


def test_decoding_a_batch_in_the_main_process_gives_the_workers_crops(tmp_path, sample):
    # The --decode gpu path (workers read bytes, the batch is decoded together where it trains, nvJPEG on a GPU),
    # run here on the CPU, whose decoder is the workers' own: the same pixels, a PNG named .JPEG included.
    data = load_dataset("imagenet", sample, image_size=24)
    odd = data.train.paths[3]
    with Image.open(odd) as image:
        image.save(tmp_path / "png.JPEG", format="PNG")
    files = FolderDataset([*data.train.paths[:3], tmp_path / "png.JPEG", *data.train.paths[4:]],
                          data.train.labels.tolist(), data.class_names, 24, 3)

    def epoch(**kwargs):
        return list(make_batches(files, 8, shuffle=True, seed=2, augment="resized-crop-flip", **kwargs))

    in_workers = epoch(num_workers=1)
    decoded_here = epoch(num_workers=1, decode_device=torch.device("cpu"))
    assert [len(x) for x, _ in decoded_here] == [8, 8, 8, 3]
    for (a, ya), (b, yb) in zip(in_workers, decoded_here, strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)


def test_class_names_come_from_the_synset_list_or_torchvisions_for_all_1000(tmp_path):
    synsets = [f"n{number:08d}" for number in range(1000)]  # sorted, as the train folders are
    names = imagenet._class_names(tmp_path, synsets, None)
    assert names[:3] == ["tench", "goldfish", "great white shark"] and len(set(names)) == 1000
    (tmp_path / "LOC_synset_mapping.txt").write_text("n02012849 crane\nn03126707 crane\nn01440764 tench, Tinca tinca\n")
    assert imagenet._class_names(tmp_path, ["n01440764", "n02012849", "n03126707", "n09999999"], None) == [
        "tench", "crane n02012849", "crane n03126707", "n09999999"]
