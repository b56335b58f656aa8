"""The pretraining recipe as data: validated once where it enters, then trusted."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import RobustTransferError
from ..models.registry import check_arch
from ..models.spec import check_options
from ..parsing import parse_eps
from ..runtime import PRECISIONS
from ..threat import ThreatModel
from .objectives import METHODS
from .schedule import SCHEDULES

# Fields that change how a run is executed but not what it computes: a resume may change them.
EXECUTION_FIELDS = ("out_dir", "resume", "progress", "device", "num_workers", "data_root")


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run. eps is in [0, 1] pixel units."""

    dataset: str = "fashion-mnist"
    arch: str = "small_resnet"
    arch_options: dict = field(default_factory=dict)  # keyword arguments of a timm architecture or builder
    out_dir: str = "runs/pretrain"
    data_root: str | None = None
    method: str = "pgd"
    norm: str = "l2"
    eps: float = 1.0
    attack_steps: int = 7
    attack_step_size: float | None = None
    random_start: bool = True
    free_replays: int = 4
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: list[int] = field(default_factory=list)
    label_smoothing: float = 0.0
    augment: str | None = None
    val_fraction: float = 0.1
    train_examples: int | None = None
    eval_examples: int = 1000
    eval_steps: int = 10
    test_steps: int = 20
    test_examples: int | None = None
    precision: str = "auto"
    device: str = "auto"
    num_workers: int = 0
    seed: int = 0
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        self.eps = parse_eps(self.eps)
        self.arch_options = check_options(self.arch_options)
        check_arch(self.arch)
        ThreatModel(self.norm, self.eps)  # validates the norm
        if self.method not in METHODS:
            raise RobustTransferError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.schedule not in SCHEDULES:
            raise RobustTransferError(f"unknown schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise RobustTransferError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        for name in ("epochs", "batch_size", "attack_steps", "free_replays", "eval_examples"):
            if int(getattr(self, name)) < 1:
                raise RobustTransferError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "momentum", "label_smoothing", "warmup_epochs"):
            if float(getattr(self, name)) < 0:
                raise RobustTransferError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            raise RobustTransferError(f"val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.train_examples is not None and self.train_examples < self.batch_size:
            raise RobustTransferError(
                f"train-examples ({self.train_examples}) must be at least the batch size ({self.batch_size})")

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(self.norm, self.eps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def recipe(self) -> dict:
        """The fields that determine the result (what a resumed run must agree on); ``arch_options`` only when
        set, so runs recorded before it existed keep their identity."""
        return {k: v for k, v in self.to_dict().items()
                if k not in EXECUTION_FIELDS and not (k == "arch_options" and not v)}

    @classmethod
    def from_dict(cls, values: dict) -> PretrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RobustTransferError(f"unknown pretraining settings: {', '.join(unknown)}")
        return cls(**values)
