"""`transfer`: a source model to a target dataset, in fixed-feature, full or partial mode."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset

from .. import __version__
from ..atomic import atomic_write_text, remove_stale_temporaries
from ..data import InMemoryDataset, load_dataset, sample_examples
from ..data.augment import EVAL_TRANSFORM
from ..data.folder import ImageFiles, join_files
from ..data.resolution import at_resolution
from ..errors import RobustTransferError
from ..evaluation import evaluate
from ..models import NormalizedModel, load_model, save_model
from ..models.model_file import unwrap
from ..models.registry import CUSTOM
from ..models.stages import num_stages, replace_head
from ..models.surgery import classifier_head
from ..rundir import run_folder
from ..runtime import loader_workers, resolve_device, resolve_precision, tune_malloc
from .config import TransferConfig, recipe_of
from .features import FeatureCache, extract_features, feature_extractor, model_content_hash
from .finetune import FinetuneRecipe, finetune
from .linear_probe import fit_linear_head
from .metrics import score
from .predict import predict
from .record import Selection, SourceSummary, TargetSummary, TransferRecord

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path.home() / ".cache" / "robust-transfer" / "features"
MODEL_NAME = "model.safetensors"
RECORD_NAME = "result.json"
CHECKPOINT_DIR = "checkpoints"  # per-epoch fine-tuning checkpoints, removed once the result is written


@dataclass
class TransferResult:
    """Where the transferred model and its record are, the record itself, and the model (on the CPU, eval mode)."""

    out_dir: Path
    model_path: Path
    record: TransferRecord
    model: nn.Module | None = field(default=None, repr=False)

    @property
    def test_score(self) -> float:
        return self.record.test_score


def _concat(first, second):
    if isinstance(first, ImageFiles) and isinstance(second, ImageFiles):  # still streamable from the files
        return join_files(first, second)
    if isinstance(first, InMemoryDataset) and isinstance(second, InMemoryDataset):
        return InMemoryDataset(torch.cat([first.images, second.images]), torch.cat([first.labels, second.labels]),
                               first.class_names)
    return ConcatDataset([first, second])


def transfer(config: TransferConfig | None = None, *, model: nn.Module | None = None,
             **overrides: Any) -> TransferResult:
    """Transfer ``config.source`` (or ``model``, a source in memory) to ``config.dataset``; write the model and a
    JSON record.

    ``model`` is any model taking [0, 1] images with its normalisation in front (`create_model`,
    `with_normalization`, `load_model`); it is copied, never changed. Its transferred model saves like any
    other, and reloads when its architecture can be rebuilt (registered, ``timm:NAME`` or a recorded builder).

    Returns the record: full configuration, the source's identity (content hash and metadata),
    the validation scores behind the chosen penalty or learning rate, the test score (top-1 or
    mean per-class accuracy, as the protocol asks), robust accuracy under ``eval_attack``, timings.

    Fine-tuning (every mode but the fast fixed-feature protocol) writes a checkpoint per learning
    rate after every epoch into ``out_dir``/checkpoints/ and removes them once the result is
    written. With ``resume=True`` an interrupted run continues from them: finished learning rates
    are loaded, not retrained, and the result equals that of an uninterrupted run; a finished
    run with the same settings is returned as it is.
    """
    if model is not None:
        model = _in_memory_source(model)
        overrides.setdefault("source", f"<in-memory {model.spec.arch} model>")
    config = dataclasses.replace(config, **overrides) if config else TransferConfig(**overrides)
    started = time.perf_counter()
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    with run_folder(config.out_dir) as out_dir:  # one run at a time in a folder
        return _transfer(config, out_dir, device, precision, started, model)


def _in_memory_source(model: nn.Module) -> NormalizedModel:
    """A CPU copy in eval mode of a user's source model, checked to carry its normalisation."""
    model = unwrap(model)
    if not isinstance(model, NormalizedModel):
        raise RobustTransferError(
            f"the source model ({type(model).__name__}) has no normalisation in front, so eps and inputs would mean "
            "nothing fixed: wrap it with with_normalization(model, mean, std), or build it with create_model"
        )
    if model.spec.arch == CUSTOM:
        log.warning("the source is a model of your own with no recorded builder: its transferred model is saved, "
                    "but load_model cannot rebuild it; wrap it with with_normalization(..., "
                    "builder='package.module:function') to make it reloadable")
    return copy.deepcopy(model).cpu().eval()


def _transfer(config: TransferConfig, out_dir: Path, device: torch.device, precision: str,
              started: float, in_memory: NormalizedModel | None) -> TransferResult:
    tune_malloc()
    checkpoints = out_dir / CHECKPOINT_DIR
    for folder in (out_dir, checkpoints):  # leftovers of writes killed mid-way
        remove_stale_temporaries(folder)
    unfinished = checkpoints.is_dir() and any(checkpoints.glob("*.pt"))
    if unfinished and not config.resume:
        raise RobustTransferError(f"{out_dir} holds the checkpoints of an unfinished transfer: pass --resume to "
                                  f"continue it, or choose another output folder (or delete {checkpoints})")
    source = in_memory if in_memory is not None else load_model(config.source, config.source_arch,
                                                                 options=config.source_options)
    source_hash = model_content_hash(source)
    if config.resume and not unfinished:
        finished = _finished_result(out_dir, config, source_hash)
        if finished is not None:
            return finished
    image_size = config.image_size or source.metadata.get("input_size")
    data = load_dataset(config.dataset, config.data_root, val_fraction=config.val_fraction, seed=config.seed,
                        image_size=image_size, in_channels=source.spec.in_channels)
    if config.resolution is not None:
        data = at_resolution(data, config.resolution)
    train_set = sample_examples(data.train, config.train_examples, config.seed)
    frozen = config.frozen_stages_spec()
    if frozen != "all" and not 0 <= frozen <= num_stages(source):
        raise RobustTransferError(f"{source.spec.arch} has {num_stages(source)} stages: use partial:0 .. "
                                  f"partial:{num_stages(source)}")

    if config.mode == "fixed" and config.protocol == "fast":
        if config.hidden:
            raise RobustTransferError("hidden head layers need fine-tuning: use --protocol paper or --mode full")
        model, selection, test_score, timings = _fixed_fast(config, source, source_hash, data, train_set,
                                                            device, precision)
    else:
        frozen_count = num_stages(source) if frozen == "all" else frozen
        identity = {"config": config.recipe(), "source_sha256": source_hash}
        model, selection, test_score, timings = _finetune_grid(config, source, data, train_set, frozen_count,
                                                               device, precision, checkpoints, identity)

    robust = None
    if config.eval_attack is not None:
        robust = evaluate(model, sample_examples(data.test, config.eval_examples, config.seed),
                          attack=config.eval_attack, device=str(device), precision=precision, seed=config.seed,
                          progress=config.progress)
    record = TransferRecord(
        config=config.recorded(),
        source=SourceSummary(str(config.source), source_hash, source.spec.arch,
                             **{k: source.metadata.get(k) for k in ("threat", "source_data", "recipe", "accuracies")}),
        target=TargetSummary(config.dataset, data.num_classes, data.metric, data.image_size, data.in_channels,
                             {"train": len(train_set), "val": len(data.val), "test": len(data.test)}),
        mode=config.mode, protocol=config.protocol if config.mode == "fixed" else "finetune", selection=selection,
        test_score=test_score, robust=robust, timings={**timings, "total_s": time.perf_counter() - started},
        software=f"robust-transfer {__version__}")
    document = record.to_dict()
    metadata = {"threat": source.metadata.get("threat"), "source_data": source.metadata.get("source_data"),
                "input_size": data.image_size, "transfer": {k: document[k] for k in ("mode", "target", "test")},
                "source_sha256": source_hash, "software": record.software}
    model_path = save_model(model.cpu(), out_dir / MODEL_NAME, metadata)
    atomic_write_text(out_dir / RECORD_NAME, json.dumps(document, indent=2))
    shutil.rmtree(checkpoints, ignore_errors=True)  # the result is safe: they are no longer needed
    log.info("%s -> %s (%s): test %s %.4f", Path(config.source).name, config.dataset, config.mode, data.metric,
             test_score)
    return TransferResult(out_dir, model_path, record, model.eval())


def _finished_result(out_dir: Path, config: TransferConfig, source_hash: str) -> TransferResult | None:
    """The result already in ``out_dir`` when it was computed with the same settings and source, else None."""
    try:
        record = TransferRecord.from_dict(json.loads((out_dir / RECORD_NAME).read_text()))
        if recipe_of(record.config) != config.recipe() or record.source.content_sha256 != source_hash:
            return None
        model = load_model(out_dir / MODEL_NAME)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RobustTransferError):
        return None  # none yet, or unreadable: compute it
    log.info("%s already holds this transfer's result", out_dir)
    return TransferResult(out_dir, out_dir / MODEL_NAME, record, model)


def _fixed_fast(config: TransferConfig, source, source_hash: str, data, train_set, device, precision):
    """Features once (cached), then L-BFGS heads over the penalty path; the head goes into the model."""
    cache = FeatureCache(config.cache_dir or DEFAULT_CACHE)
    extractor = feature_extractor(source)
    timings = {"features_s": 0.0, "cached_splits": 0}

    def features(split: str, dataset):
        key = cache.key(model=source_hash, dataset=config.dataset, root=config.data_root, split=split,
                        image_size=data.image_size, in_channels=data.in_channels, seed=config.seed,
                        val_fraction=config.val_fraction, count=len(dataset), precision=precision,
                        held_out_transform=EVAL_TRANSFORM,  # features cached before it are stale
                        **({"resolution": config.resolution} if config.resolution else {}))
        begun = time.perf_counter()
        computed, cached = cache.get_or_compute(key, lambda: extract_features(
            extractor, dataset, device, precision, progress=config.progress, description=f"features {split}"))
        if cached:
            timings["cached_splits"] += 1
        else:
            timings["features_s"] += time.perf_counter() - begun
        return computed

    (train_f, train_y), (val_f, val_y), (test_f, test_y) = (
        features("train", train_set), features("val", data.val), features("test", data.test))
    begun = time.perf_counter()
    head = fit_linear_head(train_f, train_y, val_f, val_y, data.num_classes, config.penalties, data.metric,
                           refit=config.refit)
    timings["fit_s"] = time.perf_counter() - begun
    test_score = score((test_f @ head.weight.T + head.bias).argmax(1), test_y, data.num_classes, data.metric)

    model = replace_head(copy.deepcopy(source), data.num_classes)
    _, linear = classifier_head(model.model)
    with torch.no_grad():
        linear.weight.copy_(head.weight)
        linear.bias.copy_(head.bias)
    selection = Selection("penalty", head.penalty, {f"{p:.3g}": s for p, s in sorted(head.val_scores.items())})
    return model, selection, test_score, timings


def _finetune_grid(config: TransferConfig, source, data, train_set, frozen: int, device, precision,
                   checkpoints: Path, identity: dict[str, Any]):
    """Fine-tune once per learning rate, choose on validation, then (optionally) refit on train + val.

    Each fine-tuning checkpoints into ``checkpoints`` (``lr-0.01.pt``, ``refit-lr-0.01.pt``) and
    continues from a checkpoint already there.
    """
    paper = config.protocol == "paper"

    def recipe(lr: float) -> FinetuneRecipe:
        return FinetuneRecipe(frozen_stages=frozen, epochs=config.resolved_epochs(), lr=lr,
                              batch_size=config.batch_size, momentum=config.momentum,
                              weight_decay=config.weight_decay, schedule="step" if paper else "cosine",
                              augment=config.augment or data.default_augment,
                              train_frozen_batchnorm=config.train_frozen_batchnorm, seed=config.seed)

    def fresh():
        torch.manual_seed(config.seed)  # the new head's initialisation depends on the seed alone, not on history
        return replace_head(copy.deepcopy(source), data.num_classes, hidden=config.hidden)

    def run(lr: float, dataset, stage: str):
        name = f"{stage}lr {lr:g}"
        return finetune(fresh(), dataset, recipe(lr), device, precision, config.progress, name,
                        checkpoint=checkpoints / f"{name.replace(' ', '-')}.pt", identity=identity,
                        num_workers=loader_workers(config.num_workers))

    val_scores, timings = {}, {"finetune_s": 0.0}
    best = None
    for lr in config.lrs:
        model, info = run(lr, train_set, "")
        timings["finetune_s"] += info["seconds"]
        predictions, labels = predict(model, data.val, device, precision)
        val_scores[f"{lr:g}"] = score(predictions, labels, data.num_classes, data.metric)
        if best is None or val_scores[f"{lr:g}"] > best[1]:
            best = (lr, val_scores[f"{lr:g}"], model)
    lr, _, model = best
    if config.refit:
        model, info = run(lr, _concat(train_set, data.val), "refit ")
        timings["finetune_s"] += info["seconds"]
    predictions, labels = predict(model, data.test, device, precision)
    test_score = score(predictions, labels, data.num_classes, data.metric)
    selection = Selection("lr", lr, val_scores, frozen, info["trainable_parameters"])
    return model, selection, test_score, timings
