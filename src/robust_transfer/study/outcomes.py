"""Finished runs as flat records: what the report reads, independent of how the store keeps them."""

from __future__ import annotations

from dataclasses import dataclass

from ..accuracy import EvalResult
from ..detect.record import DetectionRecord
from ..train import PretrainConfig, PretrainResult
from ..transfer.record import TransferRecord


@dataclass(frozen=True)
class SourceOutcome:
    """A source model of the study (pretrained by it, from the zoo, or a file) and its own accuracy."""

    key: str
    source: str                  # the source's label in the study spec
    arch: str
    norm: str | None             # threat model it was trained against (None: unknown)
    eps: float                   # training eps; 0 = standard training
    clean_acc: float | None      # on its own test data, when the study pretrained or evaluated it
    robust_acc: float | None     # under the study's threat model
    threat: str | None
    seconds: float
    noise_sigma: float | None = None  # Gaussian-noise augmentation's std (method noise); None otherwise


@dataclass(frozen=True)
class TransferOutcome:
    """One finished transfer run: a source to a target dataset in one mode, at one grid point and seed.

    A dense task's run (mode ``detection`` or ``instance-segmentation``) scores box AP (``test_score``, chosen
    on validation box AP) and, for instance segmentation, ``mask_ap``.
    """

    key: str
    source: str                  # label of the source model in the study spec
    arch: str
    norm: str | None
    eps: float                   # the source's training eps; 0 = standard, > 0 = robust
    dataset: str
    mode: str                    # fixed | full | partial:K | detection | instance-segmentation
    setting: str                 # the grid point's hyperparameters other than the seed, "k=v, ..." ("" if none)
    seed: int
    val_score: float             # validation score of the setting the run chose (what selection uses)
    test_score: float
    metric: str                  # top1 | mean_per_class | box AP (coco | voc | voc07)
    robust_acc: float | None     # robust accuracy after transfer, None when not measured
    robust_threat: str | None
    seconds: float
    mask_ap: float | None = None  # instance segmentation's mask AP on test
    noise_sigma: float | None = None  # the source's Gaussian-noise std (method noise); None otherwise
    target: str = ""             # the target without its resolution ("" : the same as dataset)
    resolution: int | None = None  # the low resolution the target's images were taken down to; None: native


@dataclass(frozen=True)
class PictureOutcome:
    """One source's row of a perceptual-alignment grid: ``file`` (safetensors) holds ``reference`` (the grid's
    top row: test images, or synthesis's seeds, named by ``reference_name``) and ``row`` (this source's)."""

    key: str
    source: str
    kind: str                    # inversion | synthesis | saliency
    dataset: str
    reference_name: str
    file: str


def load_outcomes(store) -> tuple[list[SourceOutcome], list[TransferOutcome]]:
    """The finished runs of a :class:`~robust_transfer.study.store.Store` as flat records."""
    transfers, sources = [], {}
    evaluations = {row.config["source_label"]: row for row in store.rows("evaluate", "done")}
    for row in store.rows("pretrain", "done"):
        recipe = PretrainConfig.from_dict(row.config["pretrain"])
        label = row.config["source_label"]
        evaluation = evaluations.get(label)
        measured = EvalResult.from_dict(evaluation.result) if evaluation else PretrainResult.from_dict(row.result).test
        seconds = (row.seconds or 0.0) + ((evaluation.seconds or 0.0) if evaluation else 0.0)
        eps = recipe.trained_threat.eps
        sources[label] = SourceOutcome(
            key=row.key, source=label, arch=recipe.arch, norm=recipe.norm if eps else None, eps=eps,
            clean_acc=measured.clean_acc if measured else None, robust_acc=measured.robust_acc if measured else None,
            threat=(measured.attack or measured.threat) if measured else None, seconds=seconds,
            noise_sigma=recipe.noise_sigma if recipe.method == "noise" else None)
    for row in store.rows("transfer", "done"):
        record, config = TransferRecord.from_dict(row.result), row.config
        source, robust = record.source, record.robust
        transfers.append(TransferOutcome(
            key=row.key, source=config["source_label"], arch=source.arch, norm=source.norm, eps=source.eps,
            dataset=config["target_label"], mode=record.mode, setting=config["setting"],
            seed=config["transfer"]["seed"], val_score=record.selection.best_val_score, test_score=record.test_score,
            metric=record.metric, robust_acc=robust.robust_acc if robust else None,
            robust_threat=(robust.attack or robust.threat) if robust else None, seconds=row.seconds or 0.0,
            noise_sigma=source.noise_sigma, target=config.get("target", config["target_label"]),
            resolution=config.get("resolution")))
        _note_source(sources, row, source)
    for row in store.rows("detect", "done"):
        record, config = DetectionRecord.from_dict(row.result), row.config
        source = record.source
        transfers.append(TransferOutcome(
            key=row.key, source=config["source_label"], arch=source.arch, norm=source.norm, eps=source.eps,
            dataset=config["target_label"], mode=record.task, setting=config["setting"], seed=config["detect"]["seed"],
            val_score=record.selection.best_val_score, test_score=record.box_ap, metric=f"box AP ({record.metric})",
            robust_acc=None, robust_threat=None, seconds=row.seconds or 0.0, mask_ap=record.mask_ap,
            noise_sigma=source.noise_sigma, target=config["target_label"]))
        _note_source(sources, row, source)
    return list(sources.values()), transfers


def _note_source(sources: dict[str, SourceOutcome], row, source) -> None:
    """A source the study did not pretrain (a zoo model or a file) enters the list from its first run."""
    label = row.config["source_label"]
    if label not in sources:
        sources[label] = SourceOutcome(key=row.depends_on or "", source=label, arch=source.arch, norm=source.norm,
                                       eps=source.eps, clean_acc=None, robust_acc=None, threat=None, seconds=0.0,
                                       noise_sigma=source.noise_sigma)


def load_pictures(store) -> list[PictureOutcome]:
    """The finished picture runs of a store, one per source and kind."""
    return [PictureOutcome(key=row.key, source=row.config["source_label"], kind=row.result["kind"],
                           dataset=row.result["dataset"], reference_name=row.result["reference"],
                           file=row.result["file"]) for row in store.rows("pictures", "done")]
