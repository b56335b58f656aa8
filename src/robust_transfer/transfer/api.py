"""`transfer`: a source model to a target dataset, in fixed-feature, full or partial mode."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset

from .. import __version__
from ..atomic import atomic_write_text
from ..data import InMemoryDataset, first_examples, load_dataset
from ..errors import RobustTransferError
from ..evaluation import evaluate
from ..models import load_model, save_model
from ..models.stages import num_stages, replace_head
from ..models.surgery import classifier_head
from ..rundir import prepare_output_dir
from ..runtime import resolve_device, resolve_precision, tune_malloc
from ..threat import ThreatModel
from .config import TransferConfig
from .features import FeatureCache, extract_features, feature_extractor, model_content_hash
from .finetune import FinetuneRecipe, finetune
from .linear_probe import fit_linear_head
from .metrics import score
from .predict import predict

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path.home() / ".cache" / "robust-transfer" / "features"
MODEL_NAME = "model.safetensors"
RECORD_NAME = "result.json"


@dataclass
class TransferResult:
    """Where the transferred model and its record are, and the record itself."""

    out_dir: Path
    model_path: Path
    record: dict[str, Any]

    @property
    def test_score(self) -> float:
        return self.record["test"]["score"]


def _concat(first, second):
    if isinstance(first, InMemoryDataset) and isinstance(second, InMemoryDataset):
        return InMemoryDataset(torch.cat([first.images, second.images]), torch.cat([first.labels, second.labels]),
                               first.class_names)
    return ConcatDataset([first, second])


def transfer(config: TransferConfig | None = None, **overrides: Any) -> TransferResult:
    """Transfer ``config.source`` to ``config.dataset`` and write the model and a JSON record.

    Returns the record: full configuration, the source's identity (content hash and metadata),
    the validation scores behind the chosen penalty or learning rate, the test score (top-1 or
    mean per-class accuracy, as the protocol asks), robust accuracy when ``eval_eps`` > 0, timings.
    """
    config = dataclasses.replace(config, **overrides) if config else TransferConfig(**overrides)
    started = time.perf_counter()
    tune_malloc()
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    out_dir = prepare_output_dir(config.out_dir)
    source = load_model(config.source)
    source_hash = model_content_hash(source)
    image_size = config.image_size or source.metadata.get("input_size")
    data = load_dataset(config.dataset, config.data_root, val_fraction=config.val_fraction, seed=config.seed,
                        image_size=image_size, in_channels=source.spec.in_channels)
    train_set = first_examples(data.train, config.train_examples)
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
        model, selection, test_score, timings = _finetune_grid(config, source, data, train_set, frozen_count,
                                                               device, precision)

    robust = None
    if config.eval_eps > 0:
        robust = evaluate(model, data.test, ThreatModel(config.eval_norm, config.eval_eps), steps=config.eval_steps,
                          device=str(device), precision=precision, max_examples=config.eval_examples,
                          seed=config.seed, progress=config.progress).to_dict()
    record = {
        "config": config.to_dict(),
        "source": {"path": str(config.source), "content_sha256": source_hash, "arch": source.spec.arch,
                   **{k: source.metadata.get(k) for k in ("threat", "source_data", "recipe", "accuracies")}},
        "target": {"dataset": config.dataset, "num_classes": data.num_classes, "metric": data.metric,
                   "image_size": data.image_size, "in_channels": data.in_channels,
                   "sizes": {"train": len(train_set), "val": len(data.val), "test": len(data.test)}},
        "mode": config.mode,
        "protocol": config.protocol if config.mode == "fixed" else "finetune",
        "selection": selection,
        "test": {"score": test_score, "metric": data.metric},
        "robust": robust,
        "timings": {**timings, "total_s": time.perf_counter() - started},
        "software": f"robust-transfer {__version__}",
    }
    metadata = {"threat": source.metadata.get("threat"), "source_data": source.metadata.get("source_data"),
                "input_size": data.image_size, "transfer": {k: record[k] for k in ("mode", "target", "test")},
                "source_sha256": source_hash, "software": record["software"]}
    model_path = save_model(model.cpu(), out_dir / MODEL_NAME, metadata)
    atomic_write_text(out_dir / RECORD_NAME, json.dumps(record, indent=2))
    log.info("%s -> %s (%s): test %s %.4f", Path(config.source).name, config.dataset, config.mode, data.metric,
             test_score)
    return TransferResult(out_dir, model_path, record)


def _fixed_fast(config: TransferConfig, source, source_hash: str, data, train_set, device, precision):
    """Features once (cached), then L-BFGS heads over the penalty path; the head goes into the model."""
    cache = FeatureCache(config.cache_dir or DEFAULT_CACHE)
    extractor = feature_extractor(source)
    timings = {"features_s": 0.0, "cached_splits": 0}

    def features(split: str, dataset):
        key = cache.key(model=source_hash, dataset=config.dataset, root=config.data_root, split=split,
                        image_size=data.image_size, in_channels=data.in_channels, seed=config.seed,
                        val_fraction=config.val_fraction, count=len(dataset), precision=precision)
        cached = cache.get(key)
        if cached is not None:
            timings["cached_splits"] += 1
            return cached
        begun = time.perf_counter()
        computed = extract_features(extractor, dataset, device, precision, progress=config.progress,
                                    description=f"features {split}")
        timings["features_s"] += time.perf_counter() - begun
        cache.put(key, *computed)
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
    selection = {"by": "penalty", "chosen": head.penalty,
                 "val_scores": {f"{p:.3g}": s for p, s in sorted(head.val_scores.items())}}
    return model, selection, test_score, timings


def _finetune_grid(config: TransferConfig, source, data, train_set, frozen: int, device, precision):
    """Fine-tune once per learning rate, choose on validation, then (optionally) refit on train + val."""
    paper = config.protocol == "paper"

    def recipe(lr: float) -> FinetuneRecipe:
        return FinetuneRecipe(frozen_stages=frozen, epochs=config.resolved_epochs(), lr=lr,
                              batch_size=config.batch_size, momentum=config.momentum,
                              weight_decay=config.weight_decay, schedule="step" if paper else "cosine",
                              augment=config.augment or data.default_augment,
                              train_frozen_batchnorm=config.train_frozen_batchnorm, seed=config.seed)

    def fresh():
        return replace_head(copy.deepcopy(source), data.num_classes, hidden=config.hidden)

    val_scores, timings = {}, {"finetune_s": 0.0}
    best = None
    for lr in config.lrs:
        model, info = finetune(fresh(), train_set, recipe(lr), device, precision, config.progress, f"lr {lr:g}")
        timings["finetune_s"] += info["seconds"]
        predictions, labels = predict(model, data.val, device, precision)
        val_scores[f"{lr:g}"] = score(predictions, labels, data.num_classes, data.metric)
        if best is None or val_scores[f"{lr:g}"] > best[1]:
            best = (lr, val_scores[f"{lr:g}"], model)
    lr, _, model = best
    if config.refit:
        model, info = finetune(fresh(), _concat(train_set, data.val), recipe(lr), device, precision,
                               config.progress, f"refit lr {lr:g}")
        timings["finetune_s"] += info["seconds"]
    predictions, labels = predict(model, data.test, device, precision)
    test_score = score(predictions, labels, data.num_classes, data.metric)
    selection = {"by": "lr", "chosen": lr, "val_scores": val_scores, "frozen_stages": frozen,
                 "trainable_parameters": info["trainable_parameters"]}
    return model, selection, test_score, timings
