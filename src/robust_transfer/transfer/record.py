"""`TransferRecord`: what one finished transfer run computed, as a dataclass; ``result.json`` is its JSON.

The command line, the study and the report read its attributes, never string keys; `from_dict` reads
records written by earlier versions too (fields they lack take their defaults).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..accuracy import EvalResult


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in data.items() if k in names}


@dataclass
class SourceSummary:
    """The source model: where it came from, its content hash, architecture and what its metadata says."""

    path: str
    content_sha256: str
    arch: str
    threat: dict[str, Any] | None = None       # {"norm", "eps"} it was trained against, when known
    source_data: str | None = None
    recipe: dict[str, Any] | None = None
    accuracies: dict[str, Any] | None = None

    @property
    def norm(self) -> str | None:
        return (self.threat or {}).get("norm")

    @property
    def eps(self) -> float:
        """Training eps in pixel units; 0 for a standard source (and when unknown)."""
        return float((self.threat or {}).get("eps") or 0.0)

    @property
    def noise_sigma(self) -> float | None:
        """The Gaussian noise std it was trained with (method noise), None for any other source."""
        recipe = self.recipe or {}
        return float(recipe["noise_sigma"]) if recipe.get("method") == "noise" else None


@dataclass
class TargetSummary:
    """The target dataset as the run saw it."""

    dataset: str
    num_classes: int
    metric: str                                 # top1 | mean_per_class
    image_size: int | None
    in_channels: int
    sizes: dict[str, int] = field(default_factory=dict)   # train / val / test examples


@dataclass
class Selection:
    """What was chosen on validation: a penalty (fast fixed-feature) or a learning rate (fine-tuning)."""

    by: str                                     # penalty | lr
    chosen: float
    val_scores: dict[str, float]
    frozen_stages: int | None = None
    trainable_parameters: int | None = None

    @property
    def best_val_score(self) -> float:
        return max(self.val_scores.values())


@dataclass
class TransferRecord:
    """One finished transfer: configuration, source, target, selection, test score, robustness, timings."""

    config: dict[str, Any]
    source: SourceSummary
    target: TargetSummary
    mode: str
    protocol: str
    selection: Selection
    test_score: float
    robust: EvalResult | None = None
    timings: dict[str, float] = field(default_factory=dict)
    software: str = ""

    @property
    def metric(self) -> str:
        return self.target.metric

    def to_dict(self) -> dict[str, Any]:
        """The JSON layout of result.json (``test`` holds the score and its metric)."""
        selection = {k: v for k, v in dataclasses.asdict(self.selection).items() if v is not None}
        return {"config": self.config, "source": dataclasses.asdict(self.source),
                "target": dataclasses.asdict(self.target), "mode": self.mode, "protocol": self.protocol,
                "selection": selection, "test": {"score": self.test_score, "metric": self.metric},
                "robust": self.robust.to_dict() if self.robust is not None else None, "timings": self.timings,
                "software": self.software}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransferRecord:
        """Read what `to_dict` wrote."""
        return cls(config=data["config"], source=SourceSummary(**_known(SourceSummary, data["source"])),
                   target=TargetSummary(**_known(TargetSummary, data["target"])), mode=data["mode"],
                   protocol=data["protocol"], selection=Selection(**_known(Selection, data["selection"])),
                   test_score=data["test"]["score"],
                   robust=EvalResult.from_dict(data["robust"]) if data.get("robust") else None,
                   timings=data.get("timings", {}), software=data.get("software", ""))
