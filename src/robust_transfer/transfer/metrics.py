"""Transfer scores: top-1 accuracy, or mean per-class accuracy where the paper's protocol uses it."""

from __future__ import annotations

import torch

METRICS = ("top1", "mean_per_class")


def score(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int, metric: str = "top1") -> float:
    """Top-1 accuracy, or the mean over classes present in ``labels`` of each class's accuracy."""
    correct = (predictions == labels).float()
    if metric == "top1":
        return float(correct.mean()) if len(labels) else 0.0
    per_class_total = torch.bincount(labels, minlength=num_classes).float()
    per_class_correct = torch.bincount(labels, weights=correct, minlength=num_classes)
    present = per_class_total > 0
    return float((per_class_correct[present] / per_class_total[present]).mean())
