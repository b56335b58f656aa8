"""Detection and instance segmentation transfer: AP against pycocotools, the three layouts, bad input, training,
resume and the command line, on scenes drawn from real photographs (no network)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from safetensors.torch import load_file

import robust_transfer
from robust_transfer.cli import main
from robust_transfer.data.decode import read_original
from robust_transfer.data.detection import DetectionDataset, decode, read_detection_data
from robust_transfer.data.scenes import SceneRecipe, write_scenes
from robust_transfer.detect import build_detector, detect, load_detector
from robust_transfer.detect.backbone import stage_maps
from robust_transfer.detect.metrics import coco_scores, voc_scores
from robust_transfer.detect.predict import predict_detections
from robust_transfer.errors import RobustTransferError
from robust_transfer.models import create_model, load_model, save_model
from robust_transfer.study import Store, load_outcomes, parse_spec, plan_runs, run_study
from robust_transfer.study.report import write_report
from robust_transfer.train.checkpoint import load_checkpoint
from tests.processes import kill_when

SMALL = SceneRecipe(train=24, val=6, test=8, size=64, objects=(1, 2), scale=(1.0, 1.3))
# Narrow heads and no resize: a few seconds per epoch on two cores.
TINY = dict(epochs=1, batch_size=4, min_size=64, max_size=64, fpn_channels=16, representation=32, roi_samples=32,
            precision="fp32", device="cpu", progress=False)
VOC_NAMES = {"Trouser": "person", "Sneaker": "car", "Bag": "bottle"}  # the scenes' classes under VOC class names


# ---------------------------------------------------------------------------------------------- AP on known cases


def _truth(boxes: list[list[float]], category: int = 1) -> dict:
    """One 100x100 image holding ``boxes`` ([x, y, w, h]) of one category, in COCO form."""
    return {"images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 100}],
            "categories": [{"id": category, "name": "thing"}],
            "annotations": [{"id": i, "image_id": 1, "category_id": category, "bbox": box, "area": box[2] * box[3],
                             "iscrowd": 0} for i, box in enumerate(boxes, 1)]}


def _found(boxes: list[list[float]], scores: list[float], category: int = 1) -> list[dict]:
    return [{"image_id": 1, "category_id": category, "bbox": box, "score": score} for box, score in
            zip(boxes, scores, strict=True)]


def test_perfect_boxes_score_one_in_every_metric():
    boxes = [[10, 10, 30, 20], [50, 40, 20, 40]]
    truth, found = _truth(boxes), _found(boxes, [0.9, 0.8])
    for scores in (coco_scores(truth, found), voc_scores(truth, found), voc_scores(truth, found, eleven_point=True)):
        assert scores.ap == pytest.approx(1.0) and scores.ap50 == pytest.approx(1.0)
        assert scores.per_class == {"thing": pytest.approx(1.0)}


def test_a_shifted_box_scores_at_the_thresholds_its_overlap_passes():
    # shifted 4.7 px along x: IoU = 15.3 * 20 / (800 - 15.3 * 20) = 0.619, so it counts at IoU 0.50, 0.55, 0.60
    truth, found = _truth([[20, 20, 20, 20]]), _found([[24.7, 20, 20, 20]], [0.9])
    coco = coco_scores(truth, found)
    assert (coco.ap, coco.ap50, coco.ap75) == (pytest.approx(0.3), pytest.approx(1.0), pytest.approx(0.0))
    voc = voc_scores(truth, found)
    assert (voc.ap, voc.ap50, voc.ap75) == (pytest.approx(0.3), pytest.approx(1.0), pytest.approx(0.0))


def test_a_confident_false_positive_costs_what_pycocotools_and_voc_say():
    # ranked: a miss, then two hits -> precision 0, 1/2, 2/3 at recall 0, 1/2, 1: every AP rule gives 2/3
    truth = _truth([[10, 10, 20, 20], [60, 60, 20, 20]])
    found = _found([[40, 5, 10, 10], [10, 10, 20, 20], [60, 60, 20, 20]], [0.95, 0.9, 0.8])
    expected = pytest.approx(2 / 3, abs=1e-3)
    assert coco_scores(truth, found).ap50 == expected
    assert voc_scores(truth, found).ap50 == expected
    assert voc_scores(truth, found, eleven_point=True).ap50 == expected
    # a duplicate of a matched box is a false positive too, after both hits: precision 1, 1, 2/3
    duplicate = _found([[10, 10, 20, 20], [60, 60, 20, 20], [11, 10, 20, 20]], [0.9, 0.8, 0.7])
    assert voc_scores(truth, duplicate).ap50 == pytest.approx(1.0) == coco_scores(truth, duplicate).ap50


def test_voc_difficult_objects_are_neither_found_nor_missed():
    truth = _truth([[10, 10, 20, 20], [60, 60, 20, 20]])
    truth["annotations"][1]["iscrowd"] = 1  # how the VOC reader keeps "difficult"
    assert voc_scores(truth, _found([[10, 10, 20, 20]], [0.9])).ap50 == pytest.approx(1.0)
    assert voc_scores(truth, _found([[10, 10, 20, 20], [60, 60, 20, 20]], [0.9, 0.95])).ap50 == pytest.approx(1.0)


def test_masks_score_with_pycocotools_segm():
    truth = _truth([[10, 10, 20, 20]])
    full = np.zeros((100, 100), dtype=np.uint8, order="F")
    full[10:30, 10:30] = 1
    rle = coco_mask.encode(full)
    rle["counts"] = rle["counts"].decode("ascii")
    truth["annotations"][0]["segmentation"] = rle
    found = [{**_found([[10, 10, 20, 20]], [0.9])[0], "segmentation": rle}]
    assert coco_scores(truth, found, "segm").ap == pytest.approx(1.0)
    half = full.copy()
    half[10:30, 20:30] = 0  # half the object: IoU 0.5
    rle_half = coco_mask.encode(np.asfortranarray(half))
    rle_half["counts"] = rle_half["counts"].decode("ascii")
    scores = coco_scores(truth, [{**found[0], "segmentation": rle_half}], "segm")
    assert scores.ap50 == pytest.approx(1.0) and scores.ap75 == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------- layouts


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """A small scenes folder (COCO-format folder layout): train/, val/, test/, each with annotations.json."""
    return write_scenes(tmp_path_factory.mktemp("scenes") / "scenes", SMALL)


def _annotations(folder: Path) -> dict:
    return json.loads((folder / "annotations.json").read_text())


def _as_coco2017(scenes: Path, out: Path) -> Path:
    (out / "annotations").mkdir(parents=True)
    for split, coco_split in (("train", "train"), ("test", "val")):
        shutil.copytree(scenes / split, out / f"{coco_split}2017", ignore=shutil.ignore_patterns("*.json"))
        (out / "annotations" / f"instances_{coco_split}2017.json").write_text(json.dumps(_annotations(scenes / split)))
    return out


def _as_voc(scenes: Path, out: Path) -> Path:
    """VOCdevkit/VOC2007: JPEG images, XML boxes (1-based, inclusive), palette instance masks, ImageSets."""
    year = out / "VOCdevkit" / "VOC2007"
    for folder in ("Annotations", "JPEGImages", "SegmentationObject", "ImageSets/Main", "ImageSets/Segmentation"):
        (year / folder).mkdir(parents=True)
    for split, voc_split in (("train", "trainval"), ("test", "test")):
        coco = _annotations(scenes / split)
        names = {c["id"]: VOC_NAMES[c["name"]] for c in coco["categories"]}
        ids = []
        for image in coco["images"]:
            name = f"{voc_split}_{image['id']:05d}"
            ids.append(name)
            Image.open(scenes / split / image["file_name"]).convert("RGB").save(year / "JPEGImages" / f"{name}.jpg",
                                                                                quality=95)
            root = ET.Element("annotation")
            size = ET.SubElement(root, "size")
            for key, value in (("width", image["width"]), ("height", image["height"]), ("depth", 3)):
                ET.SubElement(size, key).text = str(value)
            objects = np.zeros((image["height"], image["width"]), dtype=np.uint8)
            mine = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
            for index, annotation in enumerate(mine, 1):
                item = ET.SubElement(root, "object")
                ET.SubElement(item, "name").text = names[annotation["category_id"]]
                ET.SubElement(item, "difficult").text = "0"
                box = ET.SubElement(item, "bndbox")
                x, y, w, h = annotation["bbox"]
                for key, value in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w), ("ymax", y + h)):
                    ET.SubElement(box, key).text = str(value)
                objects[coco_mask.decode(annotation["segmentation"]).astype(bool)] = index
            ET.ElementTree(root).write(year / "Annotations" / f"{name}.xml")
            palette = Image.fromarray(objects, mode="P")
            palette.putpalette([v for i in range(256) for v in (i, 0, 255 - i)])
            palette.save(year / "SegmentationObject" / f"{name}.png")
        for folder in ("Main", "Segmentation"):
            (year / "ImageSets" / folder / f"{voc_split}.txt").write_text("\n".join(ids) + "\n")
    return out


def _boxes(coco: dict) -> list[tuple]:
    return sorted((a["image_id"], tuple(float(v) for v in a["bbox"])) for a in coco["annotations"])


def test_the_coco_folder_layout_holds_out_nothing_when_it_has_val_and_test(scenes):
    data = read_detection_data(scenes)
    assert data.layout == "coco-folder" and data.class_names == ["Trouser", "Sneaker", "Bag"]
    assert (len(data.train.coco["images"]), len(data.val.coco["images"]), len(data.test.coco["images"])) == (24, 6, 8)
    assert _boxes(data.test.coco) == _boxes(_annotations(scenes / "test"))


def test_coco_2017_holds_validation_out_of_train_and_tests_on_val2017(scenes, tmp_path):
    data = read_detection_data(_as_coco2017(scenes, tmp_path / "coco"), val_fraction=0.25, seed=3)
    assert data.layout == "coco"
    train_ids = {i["id"] for i in data.train.coco["images"]}
    val_ids = {i["id"] for i in data.val.coco["images"]}
    assert len(val_ids) == 6 and len(train_ids) == 18 and not train_ids & val_ids
    assert _boxes(data.test.coco) == _boxes(_annotations(scenes / "test"))
    image, target = DetectionDataset(data.test, masks=True)[0]
    assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
    assert target["masks"].shape[0] == target["boxes"].shape[0] == target["labels"].shape[0]


def test_voc_boxes_and_instance_masks_read_back_as_drawn(scenes, tmp_path):
    root = _as_voc(scenes, tmp_path / "voc")
    data = read_detection_data(root, task="instance-segmentation")
    assert data.layout == "voc" and len(data.class_names) == 20
    original = _annotations(scenes / "test")
    # VOC's 1-based inclusive pixels come back as the drawn [x, y, w, h]
    assert [b for _, b in _boxes(data.test.coco)] == [b for _, b in _boxes(original)]
    read = DetectionDataset(data.test, masks=True)
    by_image = {i: [a for a in original["annotations"] if a["image_id"] == i] for i in range(1, 9)}
    for index in range(len(read)):
        _, target = read[index]
        drawn = [coco_mask.decode(a["segmentation"]) for a in by_image[index + 1]]
        assert torch.equal(target["masks"], torch.from_numpy(np.stack(drawn)).to(torch.uint8))
        flipped_image, flipped = read[index, True]
        assert torch.equal(flipped["masks"], target["masks"].flip(-1))
        assert torch.allclose(flipped["boxes"][:, [2, 0]], 64 - target["boxes"][:, [0, 2]])


# ---------------------------------------------------------------------------------------------- bad input


def _broken(scenes: Path, tmp_path: Path, change) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(scenes, folder)
    change(folder)
    return folder


def _edit(folder: Path, split: str, edit) -> None:
    coco = _annotations(folder / split)
    edit(coco)
    (folder / split / "annotations.json").write_text(json.dumps(coco))


@pytest.mark.parametrize(("change", "message"), [
    (lambda f: (f / "train" / "00003.png").unlink(),
     r"1 image\(s\) named in the annotations are missing, e\.g\. .*00003"),
    (lambda f: (f / "test" / "00001.png").write_bytes(b""), r"1 image file\(s\) are empty \(0 bytes\)"),
    (lambda f: _edit(f, "val", lambda c: c["annotations"][0].update(bbox=[50, 50, 30, 30])),
     r"1 box\(es\) lie outside their image, e\.g\. annotation 1 \[x, y, w, h\] = \[50, 50, 30, 30\]"),
    (lambda f: _edit(f, "train", lambda c: c.update(annotations=[a for a in c["annotations"]
                                                                 if a["category_id"] != 3])),
     r"class 'Bag' has \d+ instance\(s\) in .* but none in training"),
    (lambda f: _edit(f, "train", lambda c: c.update(annotations=[])), "no training image has an annotated object"),
    (lambda f: _edit(f, "test", lambda c: c["annotations"][0].update(image_id=999)), "names image 999"),
    (lambda f: (f / "val" / "extra.json").write_text("{}"), r"must hold exactly one COCO-format \.json file, found 2"),
])
def test_bad_data_gets_one_line_that_names_the_problem(scenes, tmp_path, change, message):
    folder = _broken(scenes, tmp_path, change)
    with pytest.raises(RobustTransferError, match=message) as raised:
        read_detection_data(folder)
    assert "\n" not in str(raised.value)


def test_instance_segmentation_needs_a_mask_for_every_object(scenes, tmp_path):
    folder = _broken(scenes, tmp_path, lambda f: _edit(f, "train", lambda c: c["annotations"][2].pop("segmentation")))
    read_detection_data(folder, task="detection")  # boxes alone are fine for detection
    with pytest.raises(RobustTransferError, match=r"annotation 3; instance segmentation needs a mask"):
        read_detection_data(folder, task="instance-segmentation")


def test_an_undecodable_image_is_named(scenes, tmp_path):
    folder = _broken(scenes, tmp_path, lambda f: (f / "test" / "00002.png").write_bytes(b"not a png at all"))
    with pytest.raises(RobustTransferError, match=r"cannot decode the image .*00002\.png"):
        DetectionDataset(read_detection_data(folder).test)[2]


def test_detection_images_keep_their_stored_pixel_grid_while_classification_turns_them_upright(tmp_path):
    # Boxes and masks are drawn on the stored grid; an EXIF rotation there would move every object.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", quality=95, exif=exif)
    image = decode(tmp_path / "rotated.jpg", channels=3)
    assert image.shape == (3, 20, 40) and image[:, :, :15].mean() > 0.9 and image[:, :, 25:].mean() < 0.1
    assert read_original(tmp_path / "rotated.jpg", channels=3).shape == (3, 40, 20)
    Image.fromarray(stored).save(tmp_path / "upright.jpg", quality=95)  # no EXIF: the JPEG decoder's path
    torch.testing.assert_close(decode(tmp_path / "upright.jpg", channels=3), image, atol=2 / 255, rtol=0)


def test_a_folder_in_no_known_layout_says_what_it_expected(tmp_path):
    with pytest.raises(RobustTransferError, match=r"expected COCO 2017 .*Pascal VOC .*COCO-format folder"):
        read_detection_data(tmp_path)


# ---------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """A small ResNet for 1-channel images (Fashion-MNIST's shape): scenes decode to gray for it."""
    torch.manual_seed(0)
    return str(save_model(create_model("small_resnet", 10, 1), tmp_path_factory.mktemp("source") / "source"))


def test_the_detector_normalises_as_the_source_and_trains_only_the_last_stages(source):
    model = load_model(source)
    maps = stage_maps(model, 1)
    assert len(maps.ends) >= 2 and maps.strides == sorted(maps.strides)
    detector = build_detector(model, 3, trainable_stages=1)
    assert detector.transform.image_mean == model.normalize.mean.flatten().tolist()
    assert detector.transform.image_std == model.normalize.std.flatten().tolist()
    body = detector.backbone.body
    trainable = {name for name, p in body.named_parameters() if p.requires_grad}
    last = maps.ends[-1].split(".")[0]
    assert trainable and all(name.startswith(last) for name in trainable)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in detector.modules())  # frozen BatchNorm only
    with pytest.raises(RobustTransferError, match=r"--trainable-stages must be between 0 and \d+"):
        build_detector(model, 3, trainable_stages=99)


def test_a_timm_cnn_gives_its_feature_maps_and_a_vit_gets_one_line(tmp_path):
    torch.manual_seed(0)
    resnet = load_model(str(save_model(create_model("timm:resnet10t", 10, 3), tmp_path / "resnet")))
    detector = build_detector(resnet, 2).eval()
    assert len(stage_maps(resnet, 3).ends) == 4
    with torch.no_grad():
        (out,) = detector([torch.rand(3, 64, 80)])
    assert out["boxes"].shape[1] == 4
    vit = load_model(str(save_model(create_model("timm:vit_tiny_patch16_224", 10, 3), tmp_path / "vit")))
    with pytest.raises(RobustTransferError, match=r"feature pyramid needs at least 2.*transformers") as raised:
        build_detector(vit, 2)
    assert "\n" not in str(raised.value)


# ---------------------------------------------------------------------------------------------- training


def test_detect_trains_scores_and_reloads_from_the_command_line(scenes, source, tmp_path, capsys):
    out = tmp_path / "run"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "progress"]
    assert main(["detect", source, "--data", str(scenes), "--out-dir", str(out), "--lrs", "0.02", "0.01",
                 *flags, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed["per_class"]["box"]) == {"Trouser", "Sneaker", "Bag"}
    assert 0 <= printed["box_ap"] <= printed["box_ap50"] <= 1 and printed["mask_ap"] is None
    assert printed["selection"]["by"] == "lr" and set(printed["selection"]["val_scores"]) == {"0.02", "0.01"}
    assert printed["images"] == {"train": 24, "val": 6, "test": 8} and printed["timings"]["train_s"] > 0
    assert not (out / "checkpoints").exists()  # removed once the result is written
    detector, record = load_detector(out)
    assert record.box_ap == printed["box_ap"]
    test_set = DetectionDataset(read_detection_data(scenes).test, channels=1)
    again = coco_scores(read_detection_data(scenes).test.coco,
                        predict_detections(detector, test_set, device=torch.device("cpu"), precision="fp32"))
    assert again.ap == pytest.approx(record.box_ap, abs=1e-6)  # the saved detector is the one scored
    # the same run asked again with --resume is the finished result, not a new one
    assert main(["detect", source, "--data", str(scenes), "--out-dir", str(out), "--lrs", "0.02", "0.01", *flags,
                 "--resume"]) == 0
    assert f"box AP {100 * record.box_ap:.2f}" in capsys.readouterr().out


def test_instance_segmentation_scores_masks(scenes, source, tmp_path):
    result = detect(source=source, data=str(scenes), task="instance-segmentation", out_dir=str(tmp_path / "seg"),
                    **TINY)
    record = result.record
    assert record.mask_ap is not None and 0 <= record.mask_ap <= 1 and set(record.per_class) == {"box", "mask"}
    assert json.loads((tmp_path / "seg" / "result.json").read_text())["mask_ap"] == record.mask_ap


def test_a_run_folder_with_unfinished_checkpoints_needs_resume(scenes, source, tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({}, tmp_path / "run" / "checkpoints" / "lr-0.02.pt")
    with pytest.raises(RobustTransferError, match="unfinished detection run: pass --resume"):
        detect(source=source, data=str(scenes), out_dir=str(tmp_path / "run"), **TINY)


def test_bad_settings_get_one_line_before_any_work(source, tmp_path, capsys):
    assert main(["detect", source, "--lrs", "0", "--out-dir", str(tmp_path / "a")]) == 2
    assert main(["detect", source, "--data", "/nowhere/at/all", "--out-dir", str(tmp_path / "b")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == ["error: learning rates must be > 0, got [0.0]", "error: no dataset folder /nowhere/at/all"]


# Runs detect(**settings); it sleeps after writing its first checkpoint, so the test can kill it between epochs.
KILLABLE = """
import json, logging, sys, time
import robust_transfer.train.fit as fit
from robust_transfer.detect import detect

logging.basicConfig(level=logging.INFO, format="%(message)s")
settings, pause = json.loads(sys.argv[1]), sys.argv[2] == "pause"
save = fit.save_checkpoint

def save_then_pause(path, state):
    save(path, state)
    if pause:
        print("paused", flush=True)
        time.sleep(600)

fit.save_checkpoint = save_then_pause
detect(**settings)
"""


def _start(settings: dict, pause: bool = False) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(robust_transfer.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", KILLABLE, json.dumps(settings), "pause" if pause else ""], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return output


def test_a_killed_detection_run_resumes_to_the_uninterrupted_result(scenes, source, tmp_path):
    settings = {**TINY, "source": source, "data": str(scenes), "epochs": 2, "task": "instance-segmentation"}
    whole = _start({**settings, "out_dir": str(tmp_path / "whole")})
    killed = _start({**settings, "out_dir": str(tmp_path / "killed")}, pause=True)
    checkpoint = tmp_path / "killed" / "checkpoints" / "lr-0.02.pt"
    kill_when(killed, checkpoint.exists, "the first checkpoint", 240)
    assert load_checkpoint(checkpoint)["epoch"] == 1 and not (tmp_path / "killed" / "result.json").exists()
    with pytest.raises(RobustTransferError, match="pass --resume"):  # never overwritten by accident
        detect(**settings, out_dir=str(tmp_path / "killed"))
    log = _finish(_start({**settings, "out_dir": str(tmp_path / "killed"), "resume": True}))
    assert "instance-segmentation lr 0.02: continuing after epoch 1 of 2" in log
    _finish(whole)
    resumed, expected = (load_file(tmp_path / name / "detector.safetensors") for name in ("killed", "whole"))
    assert resumed.keys() == expected.keys() and all(torch.equal(v, expected[k]) for k, v in resumed.items())
    record, reference = (json.loads((tmp_path / name / "result.json").read_text()) for name in ("killed", "whole"))
    for key in ("box_ap", "mask_ap", "per_class", "selection"):
        assert record[key] == reference[key]


# ---------------------------------------------------------------------------------------------- study and report

DETECTION_STUDY = """
name = "dense"
out_dir = "{out}"
targets = [{{ dataset = "coco-folder", data_root = "{scenes}", label = "scenes" }}]
modes = ["detection", "instance-segmentation"]

[[sources]]
label = "standard"
file = "{standard}"

[[sources]]
label = "robust"
file = "{robust}"

[detect]
epochs = 1
batch_size = 4
min_size = 64
max_size = 64
fpn_channels = 16
representation = 32
roi_samples = 32
precision = "fp32"
"""


def test_a_study_gives_the_blogs_table_standard_vs_robust_backbone(scenes, tmp_path):
    torch.manual_seed(0)
    standard = save_model(create_model("small_resnet", 10, 1), tmp_path / "standard")
    robust = save_model(create_model("small_resnet", 10, 1), tmp_path / "robust",
                        metadata={"threat": {"norm": "l2", "eps": 1.0}})
    spec = parse_spec(tomllib.loads(DETECTION_STUDY.format(out=tmp_path / "study", scenes=scenes, standard=standard,
                                                           robust=robust)))
    runs = plan_runs(spec)
    assert sorted(run.label for run in runs) == [
        "robust -> scenes detection seed 0", "robust -> scenes instance-segmentation seed 0",
        "standard -> scenes detection seed 0", "standard -> scenes instance-segmentation seed 0"]
    store_path = run_study(spec, workers=1, progress=False)
    with Store(store_path, create=False) as store:
        assert store.counts()["done"] == 4
        sources, transfers = load_outcomes(store)
    by = {(t.source, t.mode): t for t in transfers}
    assert {s.source: s.eps for s in sources} == {"standard": 0.0, "robust": 1.0}
    assert by["robust", "detection"].mask_ap is None and by["robust", "instance-segmentation"].mask_ap is not None
    files = write_report(transfers, sources, tmp_path / "report")
    text = files.markdown.read_text()
    assert "## Detection and instance segmentation: standard vs robust backbone" in text
    assert "## Table 1" not in text  # no classification runs: no classification table
    seg = by["robust", "instance-segmentation"]
    line = next(row for row in text.splitlines() if row.startswith("| instance segmentation |"))
    assert f"| {100 * seg.test_score:.2f} | {100 * seg.mask_ap:.2f} |" in line
    with open(files.table1_csv, newline="") as handle:
        table = {row["mode"]: row for row in csv.DictReader(handle)}
    assert float(table["detection"]["standard_test"]) == pytest.approx(by["standard", "detection"].test_score)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.replace('modes = ["detection", "instance-segmentation"]', 'modes = ["fixed"]'),
     "the modes fixed need a classification target, and none is listed"),
    (lambda s: s.replace('label = "scenes" }}]', 'label = "scenes" }}, "digits"]'),
     'the classification targets digits need a classification mode, e.g. "fixed"'),
    (lambda s: s.replace('targets = [{{ dataset = "coco-folder", data_root = "{scenes}", label = "scenes" }}]',
                         'targets = ["digits"]'), "the modes detection, instance-segmentation need a detection target"),
    (lambda s: s.replace('data_root = "{scenes}", ', ""), "a coco-folder target needs data_root"),
    (lambda s: s.replace("epochs = 1", "epochs = 0"), "[detect]: --epochs must be >= 1"),
    (lambda s: s.replace("epochs = 1", "epoch = 1"), "[detect]: unknown field 'epoch'"),
    (lambda s: s + "[detect.full]\nlrs = [0.1]\n", "'full' is not one of the study's modes it applies to"),
])
def test_detection_study_specs_are_checked_field_by_field(tmp_path, edit, message):
    text = edit(DETECTION_STUDY).format(out=tmp_path, scenes=tmp_path, standard="a", robust="b")
    with pytest.raises(RobustTransferError, match=re.escape(message)):
        parse_spec(tomllib.loads(text))


@pytest.mark.skipif(os.cpu_count() < 2, reason="needs two cores for two processes")
def test_detect_runs_data_parallel_under_torchrun(scenes, source, tmp_path):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(robust_transfer.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "robust_transfer", "detect", source, "--data", str(scenes), "--out-dir",
                             str(tmp_path / "ddp"), *flags, "--epochs=2", "--json"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (printed,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]  # rank 0 alone
    assert printed["images"]["train"] == 24 and 0 <= printed["box_ap"] <= 1
    assert (tmp_path / "ddp" / "detector.safetensors").exists()
