"""`detect`: a source model's stages as the backbone of a detector (or instance segmenter), trained on a target's
boxes on the training engine, chosen on validation, scored on the test split."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .. import __version__
from ..atomic import atomic_write, atomic_write_text, remove_stale_temporaries
from ..data.detection import (
    DetectionData,
    DetectionDataset,
    DetectionSplit,
    count_batches,
    detection_batches,
    read_detection_data,
)
from ..data.scenes import embedded_scenes
from ..errors import RobustTransferError
from ..models import NormalizedModel, load_model
from ..rundir import run_folder
from ..runtime import prepare_model, resolve_precision, tune_malloc
from ..train.distributed import DistributedContext, init_distributed, wrap_for_training
from ..train.fit import SGDPlan, fit
from ..transfer.features import model_content_hash
from ..transfer.record import Selection, SourceSummary
from .config import DetectConfig
from .detector import build_detector
from .metrics import Scores, coco_scores, voc_scores
from .objective import DetectionObjective
from .predict import predict_detections
from .record import DetectionRecord

log = logging.getLogger(__name__)

DETECTOR_NAME = "detector.safetensors"
RECORD_NAME = "result.json"
CHECKPOINT_DIR = "checkpoints"   # per-epoch checkpoints, one per learning rate, removed once the result is written
MAX_WARMUP_STEPS = 1000          # detectron2's warm-up


@dataclass
class DetectResult:
    """Where the detector and its record are, the record, and the detector (CPU, eval mode)."""

    out_dir: Path
    detector_path: Path
    record: DetectionRecord
    detector: nn.Module | None = field(default=None, repr=False)


def detect(config: DetectConfig | None = None, **overrides: Any) -> DetectResult:
    """Train a detector (``task="detection"``) or instance segmenter over ``config.source``'s stages on
    ``config.data``; write ``detector.safetensors`` and ``result.json`` (a `DetectionRecord`) into ``out_dir``.

    Each learning rate checkpoints after every epoch into ``out_dir``/checkpoints/; with ``resume=True`` an
    interrupted run continues from there and ends as an uninterrupted one would, and a finished run with the
    same settings is returned as it is. Under torchrun, the processes split each batch order.
    """
    config = dataclasses.replace(config, **overrides) if config else DetectConfig(**overrides)
    started = time.perf_counter()
    context = init_distributed(config.device)
    precision = resolve_precision(config.precision, context.device)
    folder = run_folder(config.out_dir) if context.is_main else contextlib.nullcontext(Path(config.out_dir))
    with folder as out_dir:  # one run at a time in a folder
        return _detect(config, Path(out_dir), context, precision, started)


def _dataset(split: DetectionSplit, config: DetectConfig, source: NormalizedModel) -> DetectionDataset:
    return DetectionDataset(split, channels=source.spec.in_channels, masks=config.task == "instance-segmentation")


def _metric(data: DetectionData) -> str:
    if data.layout != "voc":
        return "coco"
    years = {image.get("voc_year") for image in data.test.coco["images"]}
    return "voc07" if years == {"VOC2007"} else "voc"


def _score(split: DetectionSplit, detections: list[dict], metric: str, task: str) -> tuple[Scores, Scores | None]:
    boxes = coco_scores(split.coco, detections) if metric == "coco" else \
        voc_scores(split.coco, detections, eleven_point=metric == "voc07")
    masks = coco_scores(split.coco, detections, "segm") if task == "instance-segmentation" else None
    return boxes, masks


def _detect(config: DetectConfig, out_dir: Path, context: DistributedContext, precision: str,
            started: float) -> DetectResult:
    tune_malloc()
    device = context.device
    checkpoints = out_dir / CHECKPOINT_DIR
    if context.is_main:
        for folder in (out_dir, checkpoints):
            remove_stale_temporaries(folder)
    unfinished = checkpoints.is_dir() and any(checkpoints.glob("*.pt"))
    if unfinished and not config.resume:
        raise RobustTransferError(f"{out_dir} holds the checkpoints of an unfinished detection run: pass --resume to "
                                  f"continue it, or choose another output folder (or delete {checkpoints})")
    source = load_model(config.source, config.source_arch, options=config.source_options)
    source_hash = model_content_hash(source)
    if config.resume and not unfinished:
        finished = _finished_result(out_dir, config, source_hash)
        if finished is not None:
            return finished
    root = embedded_scenes() if config.on_scenes else Path(config.data)
    data = read_detection_data(root, layout=config.layout, task=config.task, val_fraction=config.val_fraction,
                               seed=config.seed)
    metric = _metric(data)
    train_set = _dataset(data.train, config, source)
    indices = train_set.with_objects()
    if config.train_images is not None and config.train_images < len(indices):
        chosen = torch.randperm(len(indices), generator=torch.Generator().manual_seed(config.seed))
        indices = sorted(indices[i] for i in chosen[:config.train_images].tolist())
    if len(indices) < config.batch_size * context.world_size:
        raise RobustTransferError(f"{data.train.source}: {len(indices)} training image(s) with objects, fewer than one "
                                  f"batch ({config.batch_size} x {context.world_size} process(es)); lower --batch-size")
    shape = config.shape()
    num_classes = len(data.class_names)
    steps = count_batches(len(indices), config.batch_size, context.world_size)
    epochs = config.resolved_epochs()
    warmup = config.warmup_steps if config.warmup_steps is not None else min(MAX_WARMUP_STEPS, epochs * steps // 10)
    identity = {"config": config.recipe(), "source_sha256": source_hash}

    def batches(epoch: int):
        return detection_batches(train_set, config.batch_size, indices=indices, shuffle=True, flip=True,
                                 seed=config.seed, epoch=epoch, rank=context.rank, world_size=context.world_size,
                                 workers=config.workers, drop_last=True)

    val_set, timings = _dataset(data.val, config, source), {"train_s": 0.0, "eval_s": 0.0}
    val_scores: dict[str, float] = {}
    best: tuple[float, float, nn.Module] | None = None
    for lr in config.lrs:
        torch.manual_seed(config.seed)  # the new layers' initialisation depends on the seed alone
        detector = prepare_model(build_detector(source, num_classes, task=config.task,
                                                trainable_stages=config.trainable_stages, shape=shape),
                                 device)
        plan = SGDPlan(epochs=epochs, steps_per_epoch=steps, lr=lr, momentum=config.momentum,
                       weight_decay=config.weight_decay, schedule="cosine", warmup_steps=warmup, seed=config.seed)
        train_model = wrap_for_training(detector, context, find_unused_parameters=config.task != "detection")
        _, seconds = fit(detector, batches, plan, objective=DetectionObjective(), device=device, precision=precision,
                         train_model=train_model, context=context, checkpoint=checkpoints / f"lr-{lr:g}.pt",
                         identity=identity, progress=config.progress, description=f"{config.task} lr {lr:g}")
        timings["train_s"] += seconds
        begun = time.perf_counter()
        score = 0.0
        if context.is_main:
            detections = predict_detections(detector, val_set, batch_size=config.batch_size, device=device,
                                            precision=precision, progress=config.progress, description="validation")
            score = _score(data.val, detections, metric, config.task)[0].ap
        timings["eval_s"] += time.perf_counter() - begun
        val_scores[f"{lr:g}"] = score
        if best is None or score > best[1]:
            best = (lr, score, detector)
        context.barrier()
    lr, _, detector = best
    if not context.is_main:
        return DetectResult(out_dir, out_dir / DETECTOR_NAME, None, detector.cpu().eval())
    begun = time.perf_counter()
    test_set = _dataset(data.test, config, source)
    detections = predict_detections(detector, test_set, batch_size=config.batch_size, device=device,
                                    precision=precision, progress=config.progress, description="test")
    boxes, masks = _score(data.test, detections, metric, config.task)
    timings["eval_s"] += time.perf_counter() - begun
    trainable = sum(p.numel() for p in detector.parameters() if p.requires_grad)
    per_class = {"box": boxes.per_class, **({"mask": masks.per_class} if masks is not None else {})}
    record = DetectionRecord(
        config=config.to_dict(),
        source=SourceSummary(str(config.source), source_hash, source.spec.arch,
                             **{k: source.metadata.get(k) for k in ("threat", "source_data", "recipe", "accuracies")}),
        task=config.task, layout=data.layout, metric=metric, class_names=data.class_names,
        images={"train": len(indices), "val": len(val_set), "test": len(test_set)},
        selection=Selection("lr", lr, val_scores, trainable_parameters=trainable),
        box_ap=boxes.ap, box_ap50=boxes.ap50, box_ap75=boxes.ap75,
        mask_ap=masks.ap if masks is not None else None, mask_ap50=masks.ap50 if masks is not None else None,
        per_class=per_class, timings={**timings, "total_s": time.perf_counter() - started},
        software=f"robust-transfer {__version__}")
    detector = detector.cpu().eval()
    state = {k: v.contiguous() for k, v in detector.state_dict().items()}
    atomic_write(out_dir / DETECTOR_NAME, lambda handle: handle.write(safetensors_bytes(state)))
    atomic_write_text(out_dir / RECORD_NAME, json.dumps(record.to_dict(), indent=2))
    shutil.rmtree(checkpoints, ignore_errors=True)  # the result is safe: they are no longer needed
    log.info("%s -> %s (%s): box AP %.4f", Path(config.source).name, config.data, config.task, boxes.ap)
    return DetectResult(out_dir, out_dir / DETECTOR_NAME, record, detector)


def load_detector(out_dir: str | Path) -> tuple[nn.Module, DetectionRecord]:
    """The detector a finished `detect` run wrote into ``out_dir`` (eval mode, CPU), and its record.

    It is rebuilt from the record: the source model (its file or zoo name must still be there) gives the
    architecture, the saved weights replace everything.
    """
    out_dir = Path(out_dir)
    try:
        record = DetectionRecord.from_dict(json.loads((out_dir / RECORD_NAME).read_text()))
    except FileNotFoundError:
        raise RobustTransferError(f"{out_dir} holds no finished detection run (no {RECORD_NAME})") from None
    config = DetectConfig(**{**record.config, "resume": False})
    source = load_model(config.source, config.source_arch, options=config.source_options)
    detector = build_detector(source, len(record.class_names), task=config.task,
                              trainable_stages=config.trainable_stages, shape=config.shape())
    detector.load_state_dict(load_file(out_dir / DETECTOR_NAME))
    return detector.eval(), record


def _finished_result(out_dir: Path, config: DetectConfig, source_hash: str) -> DetectResult | None:
    """The result already in ``out_dir`` when it was computed with the same settings and source, else None."""
    try:
        record = DetectionRecord.from_dict(json.loads((out_dir / RECORD_NAME).read_text()))
        if DetectConfig(**record.config).recipe() != config.recipe() or record.source.content_sha256 != source_hash:
            return None
        detector, _ = load_detector(out_dir)
    except (OSError, ValueError, KeyError, TypeError, RobustTransferError):
        return None  # none yet, or unreadable: compute it
    log.info("%s already holds this detection run's result", out_dir)
    return DetectResult(out_dir, out_dir / DETECTOR_NAME, record, detector)
