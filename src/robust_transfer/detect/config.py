"""The detection transfer recipe as data, validated once where it enters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config_flags import helped
from ..data.detection import LAYOUTS, TASKS
from ..data.scenes import SCENES_NAME, SceneRecipe
from ..errors import RobustTransferError
from ..models.spec import check_options
from ..runtime import PRECISIONS
from .detector import DetectorShape

EXECUTION_FIELDS = ("out_dir", "progress", "device", "resume", "workers")
_SOURCE_FIELDS = ("source_arch", "source_options")

DATASET_SHAPE = DetectorShape()
"""Real photographs (COCO, VOC): detectron2's sizes, short side resized to 800 px."""
SCENES_SHAPE = DetectorShape(fpn_channels=64, representation=256, min_size=SceneRecipe().size,
                             max_size=SceneRecipe().size, roi_samples=128)
"""The embedded scenes: small images with up to three objects, and small sources; narrow heads, no resize."""


@dataclass
class DetectConfig:
    """One detection (Faster R-CNN) or instance segmentation (Mask R-CNN) transfer of ``source``.

    ``data`` is a folder in one of the layouts `robust_transfer.data.detection` reads, or ``scenes`` for the
    embedded scenes. Each learning rate in ``lrs`` trains for ``epochs``; the one with the best box AP on
    the validation split (held out of train) is reported on the test split (COCO val2017, VOC 2007 test).
    Sizes left at None follow the data: detectron2's for real photographs, small ones for the scenes.
    """

    source: str = ""
    source_arch: str | None = field(default=None, metadata=helped(
        "the source's architecture when its file does not name it (e.g. timm:resnet50)", flag="--arch"))
    source_options: dict = field(default_factory=dict, metadata=helped(
        "keyword argument of the source's timm architecture or builder, repeatable (NAME=VALUE)",
        flag="--arch-option"))
    data: str = field(default=SCENES_NAME, metadata=helped(
        "dataset folder (COCO 2017, Pascal VOC, or a COCO-format folder with train/ and val/ or test/), or "
        "'scenes' for the embedded scenes (real photographs with Fashion-MNIST objects)"))
    task: str = field(default="detection", metadata=helped(
        "detection (Faster R-CNN, box AP) or instance-segmentation (Mask R-CNN, box and mask AP)", choices=TASKS))
    layout: str = field(default="auto", metadata=helped("the folder's layout (auto: recognised from its files)",
                                                         choices=LAYOUTS))
    out_dir: str = field(default="runs/detect", metadata=helped("where detector.safetensors and result.json go"))
    epochs: int | None = field(default=None, metadata=helped("training epochs (default: 12, the 1x schedule; "
                                                              "8 on the scenes)"))
    lrs: list[float] = field(default_factory=lambda: [0.02], metadata=helped(
        "learning rates tried, chosen on validation box AP", nargs="+"))
    batch_size: int = field(default=8, metadata=helped("images per batch"))
    momentum: float = field(default=0.9, metadata=helped("SGD momentum"))
    weight_decay: float = field(default=1e-4, metadata=helped("weight decay (detectron2's)"))
    warmup_steps: int | None = field(default=None, metadata=helped(
        "linear learning-rate warm-up steps (default: a tenth of training, at most 1000)"))
    trainable_stages: int | None = field(default=None, metadata=helped(
        "how many of the source's last stages train (partial transfer; default: all but the first, as "
        "detectron2 freezes the stem and stage 1); BatchNorm stays frozen everywhere"))
    min_size: int | None = field(default=None, metadata=helped("images are resized to this short side "
                                                                "(default: 800; the scenes keep their size)"))
    max_size: int | None = field(default=None, metadata=helped("longest side after resizing (default: 1333)"))
    fpn_channels: int | None = field(default=None, metadata=helped("feature pyramid width (default: 256; "
                                                                    "scenes 64)"))
    representation: int | None = field(default=None, metadata=helped("box head width (default: 1024; scenes 256)"))
    roi_samples: int | None = field(default=None, metadata=helped(
        "proposals per image the box head trains on (default: 512; scenes 128)"))
    anchor_scale: float = field(default=8.0, metadata=helped("anchor side as a multiple of each level's stride"))
    val_fraction: float = field(default=0.1, metadata=helped("share of the training images held out for "
                                                             "validation"))
    train_images: int | None = field(default=None, metadata=helped("use a seeded random N of the training images"))
    workers: int = field(default=0, metadata=helped("DataLoader worker processes decoding images"))
    precision: str = field(default="auto", metadata=helped("auto, bf16 or fp32"))
    device: str = field(default="auto", metadata=helped("auto, cpu, cuda or cuda:N"))
    seed: int = field(default=0, metadata=helped("seed of the split, the new heads and the data order"))
    progress: bool = field(default=True, metadata=helped("no progress bars"))
    resume: bool = field(default=False, metadata=helped(
        "continue an interrupted run in --out-dir from its per-epoch checkpoints"))

    def __post_init__(self) -> None:
        if not self.source:
            raise RobustTransferError("give the source model: a model file or a zoo name")
        self.source_options = check_options(self.source_options)
        if self.task not in TASKS:
            raise RobustTransferError(f"unknown task {self.task!r}: use one of {', '.join(TASKS)}")
        if self.layout not in LAYOUTS:
            raise RobustTransferError(f"unknown layout {self.layout!r}: use one of {', '.join(LAYOUTS)}")
        if self.precision not in PRECISIONS:
            raise RobustTransferError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise RobustTransferError(f"learning rates must be > 0, got {self.lrs}")
        for name in ("epochs", "batch_size", "min_size", "max_size", "fpn_channels", "representation", "roi_samples",
                     "train_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise RobustTransferError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.trainable_stages is not None and self.trainable_stages < 0:
            raise RobustTransferError(f"--trainable-stages must be >= 0, got {self.trainable_stages}")
        if self.anchor_scale <= 0:
            raise RobustTransferError(f"--anchor-scale must be > 0, got {self.anchor_scale}")
        if self.workers < 0:
            raise RobustTransferError(f"--workers must be >= 0, got {self.workers}")

    @property
    def on_scenes(self) -> bool:
        return self.data == SCENES_NAME

    def shape(self) -> DetectorShape:
        """The detector's sizes: the fields set here, the rest from the data's defaults."""
        base = SCENES_SHAPE if self.on_scenes else DATASET_SHAPE
        chosen = {name: getattr(self, name) for name in ("min_size", "max_size", "fpn_channels", "representation",
                                                          "roi_samples") if getattr(self, name) is not None}
        return dataclasses.replace(base, anchor_scale=self.anchor_scale, **chosen)

    def resolved_epochs(self) -> int:
        if self.epochs is not None:
            return self.epochs
        return 8 if self.on_scenes else 12

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def recipe(self) -> dict:
        """The fields that determine the result (what a resumed run must agree on)."""
        return {k: v for k, v in self.to_dict().items()
                if k not in EXECUTION_FIELDS and not (k in _SOURCE_FIELDS and not v)}
