"""A detector's predictions on a split, as COCO results (what `robust_transfer.detect.metrics` scores)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pycocotools import mask as coco_mask
from torch import nn
from tqdm.auto import tqdm

from ..data.detection import DetectionDataset, detection_batches
from ..runtime import autocast

MASK_THRESHOLD = 0.5  # a mask pixel belongs to the object where Mask R-CNN's probability reaches it


def _rle(mask: torch.Tensor) -> dict[str, Any]:
    encoded = coco_mask.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    encoded["counts"] = encoded["counts"].decode("ascii")
    return encoded


@torch.no_grad()
def predict_detections(detector: nn.Module, dataset: DetectionDataset, *, batch_size: int = 8,
                       device: torch.device | None = None, precision: str = "fp32",
                       progress: bool = False, description: str = "predict") -> list[dict[str, Any]]:
    """Every detection of ``detector`` (eval mode) on ``dataset``: ``image_id``, ``category_id``, ``bbox``
    ([x, y, w, h] pixels), ``score`` and, for a Mask R-CNN, ``segmentation`` (RLE of the mask at 0.5)."""
    device = device or torch.device("cpu")
    detector.eval()
    results: list[dict[str, Any]] = []
    batches = detection_batches(dataset, batch_size)
    for images, targets in tqdm(batches, total=-(-len(dataset) // batch_size), desc=description, unit="batch",
                                leave=False, disable=not progress):
        with autocast(precision, device):
            outputs = detector([image.to(device) for image in images])
        for output, target in zip(outputs, targets, strict=True):
            boxes = output["boxes"].float().cpu()
            scores, labels = output["scores"].float().cpu(), output["labels"].cpu()
            masks = output.get("masks")
            masks = (masks[:, 0].float().cpu() >= MASK_THRESHOLD) if masks is not None else None
            for index in range(len(boxes)):
                x1, y1, x2, y2 = boxes[index].tolist()
                found = {"image_id": int(target["image_id"]), "category_id": dataset.category_of[int(labels[index])],
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(scores[index])}
                if masks is not None:
                    found["segmentation"] = _rle(masks[index])
                results.append(found)
    return results
