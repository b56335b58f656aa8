"""The pretraining recipe as data: validated once where it enters, then trusted."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..attack import Attack
from ..config_flags import helped
from ..errors import RobustTransferError
from ..models.registry import check_arch
from ..models.spec import check_options
from ..parsing import parse_eps
from ..runtime import PRECISIONS
from ..threat import ThreatModel
from .objectives import METHODS
from .schedule import SCHEDULES

# Fields that change how a run is executed but not what it computes: a resume may change them.
EXECUTION_FIELDS = ("out_dir", "resume", "progress", "device", "num_workers", "data_root", "decode", "compile")
DECODERS = ("cpu", "gpu")
# Recipe fields added after runs were recorded: part of the recipe only when set.
OPTIONAL_RECIPE_FIELDS = ("arch_options", "noise_sigma", "image_size")


@dataclass
class PretrainConfig:
    """Everything that defines a pretraining run. eps is in [0, 1] pixel units."""

    dataset: str = field(default="fashion-mnist", metadata=helped(
        "training data: fashion-mnist, animal-mnist, mnist-5k, digits, cifar10, cifar100, idx, imagefolder, "
        "imagenet (the ILSVRC-2012 folder as distributed, --data-root)"))
    arch: str = field(default="small_resnet", metadata=helped(
        "architecture: small_resnet (28 px), cifar_resnet18/50 (32 px), resnet50, ..., timm:NAME for any timm "
        "architecture, or package.module:function for your own builder"))
    arch_options: dict = field(default_factory=dict, metadata=helped(
        "keyword argument of a timm architecture or builder, repeatable (e.g. img_size=32 patch_size=4 for a ViT "
        "on 32 px images)", flag="--arch-option"))
    out_dir: str = field(default="runs/pretrain", metadata=helped(
        "run folder: checkpoint.pt, metrics.jsonl, tensorboard/, model.safetensors, results.json"))
    data_root: str | None = field(default=None, metadata=helped(
        "folder holding the dataset (default: where the dataset is installed)"))
    image_size: int | None = field(default=None, metadata=helped(
        "side of the training images in pixels: image files are decoded at it (default 224), in-memory sets "
        "resized to it (default: their own size)"))
    method: str = field(default="pgd", metadata=helped(
        "standard, pgd (PGD-AT), fgsm-rs (fast AT), free (minibatch replay) or noise (Gaussian-noise augmentation, "
        "--noise-sigma)"))
    norm: str = field(default="l2", metadata=helped("threat model: l2 or linf"))
    eps: float = field(default=1.0, metadata=helped(
        "radius in [0,1] pixel units; fractions such as 8/255 are fine; 0 = standard training", parse=parse_eps))
    attack_steps: int = field(default=7, metadata=helped("PGD steps per training batch (method pgd)"))
    attack_step_size: float | None = field(default=None, metadata=helped(
        "attack step in pixel units (default 2.5*eps/steps; 1.25*eps for fgsm-rs; eps for free)", parse=parse_eps))
    random_start: bool = field(default=True, metadata=helped("start PGD training attacks at the clean input"))
    free_replays: int = field(default=4, metadata=helped("replays of each batch (method free)"))
    noise_sigma: float = field(default=0.0, metadata=helped(
        "std of the Gaussian noise added to every training pixel, in [0,1] pixel units like eps (0.25 = 64/255; "
        "method noise)", parse=parse_eps))
    epochs: int = field(default=10, metadata=helped("training epochs"))
    batch_size: int = field(default=128, metadata=helped("global batch size (split over processes under torchrun)"))
    lr: float = field(default=0.1, metadata=helped("peak learning rate of SGD with momentum"))
    momentum: float = field(default=0.9, metadata=helped("SGD momentum"))
    weight_decay: float = field(default=5e-4, metadata=helped("weight decay"))
    schedule: str = field(default="cosine", metadata=helped("learning-rate schedule: cosine, step or constant"))
    warmup_epochs: float = field(default=0.0, metadata=helped("linear warm-up length in epochs (fractions allowed)"))
    milestones: list[int] = field(default_factory=list, metadata=helped(
        "epochs at which the step schedule multiplies the rate by 0.1"))
    label_smoothing: float = field(default=0.0, metadata=helped("label smoothing (off by default)"))
    augment: str | None = field(default=None, metadata=helped(
        "crop-flip, crop, resized-crop-flip (image files: cropped from the originals) or none (default: the "
        "dataset's own choice)"))
    val_fraction: float = field(default=0.1, metadata=helped("share of the training data held out for validation"))
    train_examples: int | None = field(default=None, metadata=helped(
        "train on a seeded random N of the training examples (quick runs)"))
    eval_examples: int = field(default=1000, metadata=helped("validation examples attacked after each epoch"))
    eval_steps: int = field(default=10, metadata=helped("PGD steps of the per-epoch robust validation"))
    test_steps: int = field(default=20, metadata=helped("PGD steps of the final robust test evaluation"))
    test_examples: int | None = field(default=None, metadata=helped(
        "evaluate the final model on a seeded random N of the test examples"))
    precision: str = field(default="auto", metadata=helped(
        "auto (bf16 autocast where the hardware is fast at it, else fp32), bf16 or fp32; convolutions run "
        "channels_last either way"))
    device: str = field(default="auto", metadata=helped("auto, cpu, cuda or cuda:N"))
    num_workers: int | None = field(default=None, metadata=helped(
        "data-loading worker processes per training process, decoding and cropping image files (default: the "
        "machine's cores shared among its training processes, at most 8; in-memory sets need none)"))
    decode: str = field(default="cpu", metadata=helped(
        "where streamed training JPEGs are decoded: cpu (in the loader workers) or gpu (nvJPEG on the training GPU "
        "through TorchCodec, the workers only reading files; needs --device cuda)"))
    compile: bool = field(default=False, metadata=helped(
        "run the training forward and the training attack through torch.compile: the first steps compile (tens "
        "of seconds to minutes), later ones may run faster; docs/BENCHMARKS.md says where it pays off"))
    seed: int = field(default=0, metadata=helped("seed of the splits, data order, augmentation and initialisation"))
    resume: bool = field(default=False, metadata=helped("continue the run in --out-dir from its checkpoint"))
    progress: bool = field(default=True, metadata=helped("no progress bars"))

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
        self.noise_sigma = parse_eps(self.noise_sigma)
        if self.method == "noise" and self.noise_sigma <= 0:
            raise RobustTransferError("method noise needs --noise-sigma > 0 (the noise std in [0,1] pixel units)")
        if self.method != "noise" and self.noise_sigma:
            raise RobustTransferError(f"--noise-sigma applies to method noise, not {self.method}")
        if self.image_size is not None and self.image_size < 8:
            raise RobustTransferError(f"image-size must be at least 8 pixels, got {self.image_size}")
        if self.decode not in DECODERS:
            raise RobustTransferError(f"unknown decode {self.decode!r}: use cpu or gpu")
        if self.num_workers is not None and self.num_workers < 0:
            raise RobustTransferError(f"num-workers must be >= 0, got {self.num_workers}")
        if self.train_examples is not None and self.train_examples < self.batch_size:
            raise RobustTransferError(
                f"train-examples ({self.train_examples}) must be at least the batch size ({self.batch_size})")

    @property
    def threat(self) -> ThreatModel:
        return ThreatModel(self.norm, self.eps)

    @property
    def adversarial(self) -> bool:
        """Trained against an adversary: an attack method with eps > 0 (not standard, not noise)."""
        return self.method not in ("standard", "noise") and self.eps > 0

    @property
    def trained_threat(self) -> ThreatModel:
        """The threat the model was trained to resist (its metadata's): eps 0 unless adversarially trained."""
        return ThreatModel(self.norm, self.eps if self.adversarial else 0.0)

    @property
    def training_attack(self) -> Attack:
        """The attack the objective trains against (fgsm-rs and free use its threat and step size)."""
        return Attack(self.threat, steps=self.attack_steps, step_size=self.attack_step_size,
                      random_start=self.random_start)

    @property
    def validation_attack(self) -> Attack | None:
        """PGD-``eval_steps`` under the training threat, after each epoch; None for standard training."""
        return Attack(self.threat, steps=self.eval_steps) if self.eps > 0 else None

    @property
    def test_attack(self) -> Attack | None:
        """PGD-``test_steps`` under the training threat, on the final model; None for standard training."""
        return Attack(self.threat, steps=self.test_steps) if self.eps > 0 else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def recipe(self) -> dict:
        """The fields that determine the result (what a resumed run must agree on); ``arch_options`` and
        ``noise_sigma``, ``image_size`` only when set, so runs recorded before they existed keep their identity."""
        return {k: v for k, v in self.to_dict().items()
                if k not in EXECUTION_FIELDS and not (k in OPTIONAL_RECIPE_FIELDS and not v)}

    @classmethod
    def from_dict(cls, values: dict) -> PretrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise RobustTransferError(f"unknown pretraining settings: {', '.join(unknown)}")
        return cls(**values)
