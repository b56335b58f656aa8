"""Detection scores: COCO mAP with pycocotools (boxes and masks), and VOC AP as VOC's own code computes it.

Detections are COCO results: dicts with ``image_id``, ``category_id``, ``bbox`` ([x, y, w, h] pixels),
``score`` and, for masks, ``segmentation`` (RLE). Ground truth is the COCO-form dictionary the data
was read into (`robust_transfer.data.detection.DetectionSplit.coco`), so what is scored is what the user's
files say.

- `coco_scores`: AP averaged over IoU 0.50:0.05:0.95 (COCO's primary metric, the paper's Box AP and Mask AP),
  AP50, AP75, and per-class AP; crowd objects are ignored as COCOeval ignores them.
- `voc_scores`: per-class AP at IoU 0.5 over the precision/recall curve, "difficult" objects (``iscrowd`` in
  our COCO form) neither matched nor missed, the 11-point rule for VOC 2007 and the area under the
  monotone envelope otherwise; ``box_ap`` is its mean over IoU 0.50:0.95, as detectron2 reports VOC.
  IoU is in continuous coordinates (no VOC "+1" pixel), as the boxes are.
"""

from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


@dataclass
class Scores:
    """AP (mean over IoU 0.50:0.95), AP50, AP75 in [0, 1], and AP per class name."""

    ap: float
    ap50: float
    ap75: float
    per_class: dict[str, float] = field(default_factory=dict)


def _ground_truth(coco: dict[str, Any]) -> COCO:
    ground_truth = COCO()
    ground_truth.dataset = {"info": {}, "licenses": [], **coco}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        ground_truth.createIndex()
    return ground_truth


def coco_scores(coco: dict[str, Any], detections: list[dict[str, Any]], iou_type: str = "bbox") -> Scores:
    """COCO mAP of ``detections`` against ``coco`` (``iou_type`` ``bbox`` or ``segm``), computed by pycocotools."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    if not detections or not coco["annotations"]:
        return Scores(0.0, 0.0, 0.0, {name: 0.0 for name in names.values()})
    ground_truth = _ground_truth(coco)
    with contextlib.redirect_stdout(io.StringIO()):
        results = ground_truth.loadRes([dict(d) for d in detections])
        evaluation = COCOeval(ground_truth, results, iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = evaluation.stats
    precision = evaluation.eval["precision"]  # [iou, recall, class, area, max detections]
    per_class = {}
    for index, category in enumerate(evaluation.params.catIds):
        values = precision[:, :, index, 0, -1]
        values = values[values > -1]
        if values.size:  # a class with ground truth in this split
            per_class[names[category]] = float(values.mean())
    return Scores(max(float(stats[0]), 0.0), max(float(stats[1]), 0.0), max(float(stats[2]), 0.0), per_class)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one [x1, y1, x2, y2] box with each row of ``boxes``."""
    x1, y1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x2, y2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-12)


def average_precision(recall: np.ndarray, precision: np.ndarray, eleven_point: bool = False) -> float:
    """Area under a precision/recall curve as VOC computes it: 11-point (VOC 2007) or the monotone envelope."""
    if eleven_point:
        return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                              for t in np.linspace(0, 1, 11)]))
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    changes = np.nonzero(r[1:] != r[:-1])[0]
    return float(np.sum((r[changes + 1] - r[changes]) * p[changes + 1]))


def _xyxy(bbox: list[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def _voc_class_ap(truth: dict[int, tuple[np.ndarray, np.ndarray]], found: list[dict[str, Any]], iou: float,
                  eleven_point: bool) -> float | None:
    positives = sum(int((~difficult).sum()) for _, difficult in truth.values())
    if positives == 0:
        return None
    found = sorted(found, key=lambda d: -d["score"])
    matched = {image: np.zeros(len(boxes), dtype=bool) for image, (boxes, _) in truth.items()}
    hits, misses = np.zeros(len(found)), np.zeros(len(found))
    for index, detection in enumerate(found):
        boxes, difficult = truth.get(detection["image_id"], (np.zeros((0, 4)), np.zeros(0, dtype=bool)))
        if len(boxes) == 0:
            misses[index] = 1
            continue
        overlaps = box_iou(np.asarray(_xyxy(detection["bbox"])), boxes)
        best = int(overlaps.argmax())
        if overlaps[best] >= iou:
            if difficult[best]:
                continue  # neither a hit nor a miss
            if not matched[detection["image_id"]][best]:
                matched[detection["image_id"]][best] = True
                hits[index] = 1
            else:
                misses[index] = 1  # a duplicate
        else:
            misses[index] = 1
    true_positives, false_positives = np.cumsum(hits), np.cumsum(misses)
    recall = true_positives / positives
    precision = true_positives / np.maximum(true_positives + false_positives, np.finfo(np.float64).eps)
    return average_precision(recall, precision, eleven_point)


def voc_scores(coco: dict[str, Any], detections: list[dict[str, Any]], eleven_point: bool = False) -> Scores:
    """VOC AP (see the module docstring); ``per_class`` holds AP50 per class."""
    names = {c["id"]: c["name"] for c in coco["categories"]}
    truth: dict[int, dict[int, tuple[list, list]]] = defaultdict(lambda: defaultdict(lambda: ([], [])))
    for annotation in coco["annotations"]:
        boxes, difficult = truth[annotation["category_id"]][annotation["image_id"]]
        boxes.append(_xyxy(annotation["bbox"]))
        difficult.append(bool(annotation.get("iscrowd")))
    arrays = {c: {i: (np.asarray(b, dtype=np.float64).reshape(-1, 4), np.asarray(d, dtype=bool))
                  for i, (b, d) in images.items()} for c, images in truth.items()}
    by_class: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for detection in detections:
        by_class[detection["category_id"]].append(detection)
    per_threshold: dict[float, dict[int, float]] = {}
    for threshold in IOU_THRESHOLDS:
        values = {c: _voc_class_ap(arrays[c], by_class.get(c, []), threshold, eleven_point) for c in arrays}
        per_threshold[threshold] = {c: v for c, v in values.items() if v is not None}
    if not per_threshold[0.5]:
        return Scores(0.0, 0.0, 0.0, {})

    def mean(threshold: float) -> float:
        return float(np.mean(list(per_threshold[threshold].values())))

    return Scores(float(np.mean([mean(t) for t in IOU_THRESHOLDS])), mean(0.5), mean(0.75),
                  {names[c]: v for c, v in sorted(per_threshold[0.5].items())})
