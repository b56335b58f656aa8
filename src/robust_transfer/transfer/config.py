"""The transfer recipe as data, validated once where it enters."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..attack import Attack
from ..config_flags import helped
from ..errors import RobustTransferError
from ..models.spec import check_options
from ..runtime import PRECISIONS
from .linear_probe import DEFAULT_PENALTIES

PROTOCOLS = ("fast", "paper")
_PARTIAL = re.compile(r"^partial:(\d+)$")
# Fields that change how a run is executed but not what it computes: a resume may change them.
EXECUTION_FIELDS = ("out_dir", "cache_dir", "progress", "device", "resume", "num_workers")
# Recorded only when set, so runs recorded before these fields existed keep their identity.
_IF_SET_FIELDS = ("source_arch", "source_options", "resolution")


@dataclass
class TransferConfig:
    """One transfer run. ``mode`` is ``fixed``, ``full`` or ``partial:K`` (first K stages frozen).

    For ``fixed`` the ``fast`` protocol fits the head by L-BFGS on cached features over
    ``penalties``; the ``paper`` protocol trains it by SGD through the frozen network
    (150 epochs, lr in {0.01, 0.001}, x0.1 every 50 epochs, batch 64, weight decay 5e-4).
    ``eval_attack`` (an `Attack`; eps in [0, 1] pixel units) measures robust accuracy after transfer
    on ``eval_examples`` test examples. Fine-tuning checkpoints every epoch into
    ``out_dir``/checkpoints/; ``resume`` continues an interrupted run from there.
    """

    source: str = ""
    source_arch: str | None = field(default=None, metadata=helped(
        "the source's architecture when its file does not name it (e.g. timm:convnext_base)", flag="--arch"))
    source_options: dict = field(default_factory=dict, metadata=helped(
        "keyword argument of the source's timm architecture or builder, repeatable (NAME=VALUE)",
        flag="--arch-option"))
    dataset: str = field(default="animal-mnist", metadata=helped(
        "target dataset name (as for pretrain; imagefolder for any train/ + val|test/ folder)", required=True))
    mode: str = field(default="fixed", metadata=helped(
        "fixed (new last layer on frozen features), full (fine-tune everything) or partial:K (freeze the first K "
        "stages)"))
    out_dir: str = field(default="runs/transfer", metadata=helped("where model.safetensors and result.json go"))
    data_root: str | None = field(default=None, metadata=helped("folder holding the target dataset"))
    protocol: str = field(default="fast", metadata=helped(
        "fixed mode: fast = cached features + L-BFGS heads over --penalties chosen on validation; paper = SGD on "
        "the head through the frozen network, 150 epochs, lr x0.1 every 50", choices=PROTOCOLS))
    penalties: list[float] = field(default_factory=lambda: list(DEFAULT_PENALTIES), metadata=helped(
        "L2 penalties tried by the fast protocol (default: 7 values from 1e-4 to 1)", nargs="+"))
    epochs: int | None = field(default=None, metadata=helped("fine-tuning epochs (default: 10; paper: 150)"))
    lrs: list[float] = field(default_factory=lambda: [0.01, 0.001], metadata=helped(
        "learning rates tried, chosen on validation", nargs="+"))
    batch_size: int = field(default=64, metadata=helped("fine-tuning batch size"))
    momentum: float = field(default=0.9, metadata=helped("SGD momentum"))
    weight_decay: float = field(default=5e-4, metadata=helped("weight decay"))
    refit: bool = field(default=True, metadata=helped(
        "do not retrain on train + validation with the chosen setting"))
    hidden: list[int] = field(default_factory=list, metadata=helped("hidden layer widths of the new head"))
    train_frozen_batchnorm: bool = field(default=False, metadata=helped(
        "let frozen BatchNorm layers keep updating their running statistics (the paper's code did); by default "
        "frozen layers, BatchNorm included, stay in eval mode"))
    image_size: int | None = field(default=None, metadata=helped(
        "resize target images to this side (default: the source model's training size; e.g. 32 for "
        "low-resolution transfer)"))
    resolution: int | None = field(default=None, metadata=helped(
        "downsample every target image to R x R pixels and back up to its size before anything sees it (the "
        "paper's 32 px experiment); default: full resolution", metavar="R"))
    augment: str | None = field(default=None, metadata=helped("crop-flip, crop, resized-crop-flip or none"))
    val_fraction: float = field(default=0.1, metadata=helped("share of the training data held out for validation"))
    train_examples: int | None = field(default=None, metadata=helped(
        "use a seeded random N of the training examples"))
    eval_attack: Attack | None = None   # also measure robust accuracy after transfer under this attack
    eval_examples: int | None = field(default=1000, metadata=helped(
        "test examples attacked to measure robust accuracy after transfer"))
    precision: str = field(default="auto", metadata=helped("auto, bf16 or fp32"))
    device: str = field(default="auto", metadata=helped("auto, cpu, cuda or cuda:N"))
    num_workers: int | None = field(default=None, metadata=helped(
        "data-loading worker processes decoding and cropping image files while fine-tuning (default: the "
        "machine's cores, at most 8; in-memory sets need none)"))
    seed: int = field(default=0, metadata=helped("seed of the splits, the new head and the data order"))
    cache_dir: str | None = field(default=None, metadata=helped(
        "feature cache (default: ~/.cache/robust-transfer/features)"))
    progress: bool = field(default=True, metadata=helped("no progress bars"))
    resume: bool = field(default=False, metadata=helped(
        "continue an interrupted fine-tuning in --out-dir from its per-epoch checkpoints"))

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
        if isinstance(self.eval_attack, Mapping):  # read back from JSON (a study's store, a result record)
            self.eval_attack = Attack.from_dict(self.eval_attack)
        if self.eval_attack is not None and not isinstance(self.eval_attack, Attack):
            raise RobustTransferError(f"eval_attack must be an Attack, got {type(self.eval_attack).__name__}")
        if self.eval_attack is not None and self.eval_attack.threat.eps == 0:
            self.eval_attack = None  # eps 0: nothing to attack
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise RobustTransferError(f"learning rates must be > 0, got {self.lrs}")
        if not self.penalties or any(p <= 0 for p in self.penalties):
            raise RobustTransferError(f"penalties must be > 0, got {self.penalties}")
        if self.epochs is not None and self.epochs < 1:
            raise RobustTransferError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise RobustTransferError(f"batch size must be >= 1, got {self.batch_size}")
        if self.resolution is not None and self.resolution < 1:
            raise RobustTransferError(f"resolution must be a positive number of pixels, got {self.resolution}")

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
        """JSON-ready; the attack as `Attack.to_dict` writes it."""
        out = dataclasses.asdict(self)
        out["eval_attack"] = self.eval_attack.to_dict() if self.eval_attack is not None else None
        return out

    def recorded(self) -> dict:
        """The configuration as result.json records it: all but ``resume``, so a resumed run records what an
        uninterrupted one does."""
        return {k: v for k, v in self.to_dict().items() if k != "resume"}

    def recipe(self) -> dict:
        """The fields that determine the result (what a resumed run must agree on)."""
        return recipe_of(self.to_dict())


def recipe_of(recorded: dict) -> dict:
    """The recipe part of a recorded configuration: the source's architecture fields and the resolution only when
    set, so runs recorded before they existed keep their identity."""
    return {k: v for k, v in recorded.items() if k not in EXECUTION_FIELDS and not (k in _IF_SET_FIELDS and not v)}
