"""The transfer recipe as data, validated once where it enters."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ..errors import RobustTransferError
from ..models.spec import check_options
from ..parsing import parse_eps
from ..runtime import PRECISIONS
from .linear_probe import DEFAULT_PENALTIES

PROTOCOLS = ("fast", "paper")
_PARTIAL = re.compile(r"^partial:(\d+)$")
# Fields that change how a run is executed but not what it computes: a resume may change them.
EXECUTION_FIELDS = ("out_dir", "cache_dir", "progress", "device", "resume")
_SOURCE_FIELDS = ("source_arch", "source_options")


@dataclass
class TransferConfig:
    """One transfer run. ``mode`` is ``fixed``, ``full`` or ``partial:K`` (first K stages frozen).

    For ``fixed`` the ``fast`` protocol fits the head by L-BFGS on cached features over
    ``penalties``; the ``paper`` protocol trains it by SGD through the frozen network
    (150 epochs, lr in {0.01, 0.001}, x0.1 every 50 epochs, batch 64, weight decay 5e-4).
    eps values are in [0, 1] pixel units. Fine-tuning checkpoints every epoch into
    ``out_dir``/checkpoints/; ``resume`` continues an interrupted run from there.
    """

    source: str = ""
    source_arch: str | None = None      # the source file's architecture, when the file does not name it
    source_options: dict = field(default_factory=dict)  # its timm / builder keyword arguments
    dataset: str = "animal-mnist"
    mode: str = "fixed"
    out_dir: str = "runs/transfer"
    data_root: str | None = None
    protocol: str = "fast"
    penalties: list[float] = field(default_factory=lambda: list(DEFAULT_PENALTIES))
    epochs: int | None = None           # default: 10 for fine-tuning, 150 for the paper protocol
    lrs: list[float] = field(default_factory=lambda: [0.01, 0.001])
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4
    refit: bool = True                  # retrain on train + validation with the chosen setting
    hidden: list[int] = field(default_factory=list)
    train_frozen_batchnorm: bool = False
    image_size: int | None = None       # default: the source model's training size
    augment: str | None = None
    val_fraction: float = 0.1
    train_examples: int | None = None
    eval_norm: str = "l2"
    eval_eps: float = 0.0               # > 0: also measure robust accuracy after transfer
    eval_steps: int = 20
    eval_examples: int | None = 1000
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    cache_dir: str | None = None        # default: ~/.cache/robust-transfer/features
    progress: bool = True
    resume: bool = False                # continue from out_dir's fine-tuning checkpoints (same settings)

    def __post_init__(self) -> None:
        if not self.source:
            raise RobustTransferError("give the source model: a model file, a zoo name, or model= (an nn.Module)")
        self.source_options = check_options(self.source_options)
        self.frozen_stages_spec()  # validates the mode
        if self.protocol not in PROTOCOLS:
            raise RobustTransferError(f"unknown protocol {self.protocol!r}: use one of {', '.join(PROTOCOLS)}")
        if self.protocol == "paper" and self.mode != "fixed":
            raise RobustTransferError("--protocol paper applies to --mode fixed (the head through the frozen network)")
        if self.precision not in PRECISIONS:
            raise RobustTransferError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        self.eval_eps = parse_eps(self.eval_eps)
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise RobustTransferError(f"learning rates must be > 0, got {self.lrs}")
        if not self.penalties or any(p <= 0 for p in self.penalties):
            raise RobustTransferError(f"penalties must be > 0, got {self.penalties}")
        if self.epochs is not None and self.epochs < 1:
            raise RobustTransferError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise RobustTransferError(f"batch size must be >= 1, got {self.batch_size}")

    def frozen_stages_spec(self) -> str | int:
        """``"all"`` for fixed, 0 for full, K for partial:K."""
        if self.mode == "fixed":
            return "all"
        if self.mode == "full":
            return 0
        match = _PARTIAL.match(self.mode)
        if not match:
            raise RobustTransferError(f"unknown mode {self.mode!r}: use fixed, full or partial:K (K = stages frozen)")
        return int(match.group(1))

    def resolved_epochs(self) -> int:
        if self.epochs is not None:
            return self.epochs
        return 150 if self.protocol == "paper" else 10

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def recorded(self) -> dict:
        """The configuration as result.json records it: all but ``resume``, so a resumed run records what an
        uninterrupted one does."""
        return {k: v for k, v in self.to_dict().items() if k != "resume"}

    def recipe(self) -> dict:
        """The fields that determine the result (what a resumed run must agree on)."""
        return recipe_of(self.to_dict())


def recipe_of(recorded: dict) -> dict:
    """The recipe part of a recorded configuration: the source's architecture fields only when set, so runs
    recorded before they existed keep their identity."""
    return {k: v for k, v in recorded.items() if k not in EXECUTION_FIELDS and not (k in _SOURCE_FIELDS and not v)}
