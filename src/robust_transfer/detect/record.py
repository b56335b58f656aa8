"""`DetectionRecord`: what one finished detection transfer computed; ``result.json`` is its JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..transfer.record import Selection, SourceSummary


@dataclass
class DetectionRecord:
    """Configuration, source identity, the learning rate chosen on validation, test scores and timings.

    Scores are in [0, 1]: ``box_ap`` is AP over IoU 0.50:0.95 (COCO's, the paper's Box AP; VOC AP averaged
    over the same thresholds for a VOC test set, as detectron2 reports it), ``box_ap50`` at IoU 0.5;
    ``mask_*`` for instance segmentation; ``per_class`` holds each class's box (and mask) AP.
    """

    config: dict[str, Any]
    source: SourceSummary
    task: str
    layout: str
    metric: str                          # coco | voc | voc07 (the 11-point rule)
    class_names: list[str]
    images: dict[str, int]               # train / val / test
    selection: Selection
    box_ap: float
    box_ap50: float
    box_ap75: float
    mask_ap: float | None = None
    mask_ap50: float | None = None
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    software: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["selection"] = {k: v for k, v in out["selection"].items() if v is not None}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectionRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["source"] = SourceSummary(**data["source"])
        values["selection"] = Selection(**data["selection"])
        return cls(**values)
