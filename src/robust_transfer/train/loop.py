"""Robust pretraining on the training engine: data parallelism, validation, metrics and the final test around
`run_epoch`, for every method, precision and process count."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..atomic import atomic_write_text, remove_stale_temporaries
from ..data import load_dataset, make_batches, sample_examples
from ..errors import RobustTransferError
from ..evaluation import EvalResult, evaluate
from ..models import create_model, save_model
from ..rundir import run_folder
from ..runtime import check_can_compile, loader_workers, prepare_model, resolve_precision, tune_malloc
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from .config import PretrainConfig
from .distributed import DistributedContext, all_reduce_sum, init_distributed, seed_process, wrap_for_training
from .engine import EpochTotals, TrainingState, run_epoch
from .metrics import MetricsLog
from .objectives import make_objective
from .schedule import lr_multiplier
from .step import NonFiniteLossError

log = logging.getLogger(__name__)

MODEL_NAME = "model.safetensors"
RESULTS_NAME = "results.json"


@dataclass
class PretrainResult:
    """Where a finished run lives, what it measured on the test split (None on ranks > 0 of a torchrun run),
    its per-epoch history and how long it took; `to_dict` / `from_dict` are its JSON."""

    run_dir: Path
    model_path: Path
    test: EvalResult | None
    history: list[dict[str, Any]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"run_dir": str(self.run_dir), "model_path": str(self.model_path),
                "test": self.test.to_dict() if self.test is not None else None, "history": self.history,
                "seconds": self.seconds}

    def summary(self) -> dict[str, Any]:
        """`to_dict` with the epoch count for the per-epoch history (which stays in the run's results.json)."""
        document = self.to_dict()
        document["epochs"] = len(document.pop("history"))
        return document

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainResult:
        """Read what `to_dict` (or `summary`, then without history) wrote."""
        return cls(Path(data["run_dir"]), Path(data["model_path"]),
                   EvalResult.from_dict(data["test"]) if data.get("test") else None, data.get("history", []),
                   float(data.get("seconds", 0.0)))


def _check_run_dir(run_dir: Path, config: PretrainConfig) -> None:
    """Fail before any work when the output folder would be overwritten."""
    if (run_dir / CHECKPOINT_NAME).exists() and not config.resume:
        raise RobustTransferError(
            f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
    remove_stale_temporaries(run_dir)  # left by a kill in the middle of a checkpoint write


def _resume_state(run_dir: Path, config: PretrainConfig) -> dict[str, Any] | None:
    path = run_dir / CHECKPOINT_NAME
    if not (config.resume and path.exists()):
        return None
    state = load_checkpoint(path)
    saved = state["config"]
    differing = sorted(k for k, v in config.recipe().items() if saved.get(k) != v)
    if differing:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(config, k)!r}" for k in differing[:5])
        raise RobustTransferError(
            f"cannot resume {run_dir} with a different recipe ({details}); use the original settings or a new --out")
    return state


def pretrain(config: PretrainConfig | None = None, **overrides: Any) -> PretrainResult:
    """Train a source model with ``config`` (or the defaults updated by keyword ``overrides``).

    Writes into ``config.out_dir``: checkpoint.pt after every epoch (atomically),
    metrics.jsonl and tensorboard/, and at the end model.safetensors + model.json and
    results.json. With ``resume=True`` an interrupted run continues exactly where its last
    checkpoint stopped. Under torchrun each process trains on its share of every global batch.
    """
    config = dataclasses.replace(config or PretrainConfig(), **overrides)
    tune_malloc()
    context = init_distributed(config.device)
    run_dir = Path(config.out_dir)
    if not context.is_main:
        return _pretrain(config, context, run_dir)
    with run_folder(run_dir):  # rank 0 holds the folder for the whole run
        return _pretrain(config, context, run_dir)


def _pretrain(config: PretrainConfig, context: DistributedContext, run_dir: Path) -> PretrainResult:
    precision = resolve_precision(config.precision, context.device)
    if context.is_main:
        _check_run_dir(run_dir, config)
    context.barrier()
    state = _resume_state(run_dir, config)
    if state is not None and state["epoch"] >= config.epochs and (run_dir / RESULTS_NAME).exists():
        return _finished_result(run_dir)

    if config.compile:
        check_can_compile(context.device)
    if config.decode == "gpu" and context.device.type != "cuda":
        raise RobustTransferError(f"--decode gpu decodes on the training GPU, but this run trains on {context.device}: "
                                  "use --device cuda, or --decode cpu")
    torch.manual_seed(config.seed)
    data = load_dataset(config.dataset, config.data_root, val_fraction=config.val_fraction, seed=config.seed,
                        image_size=config.image_size)
    train_set = sample_examples(data.train, config.train_examples, config.seed)
    val_set = sample_examples(data.val, config.eval_examples, config.seed)  # the same sample every epoch
    augment = config.augment or data.default_augment
    model = create_model(config.arch, num_classes=data.num_classes, in_channels=data.in_channels,
                         mean=data.mean, std=data.std, image_size=data.image_size, **config.arch_options)
    objective = make_objective(config.method, config.training_attack, config.free_replays, config.label_smoothing,
                               config.noise_sigma)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    batches_per_epoch = len(make_batches(train_set, config.batch_size, shuffle=True, drop_last=True))
    if batches_per_epoch == 0:
        raise RobustTransferError(f"the training split has fewer examples than one batch ({config.batch_size})")
    steps_per_epoch = batches_per_epoch * objective.replays
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(
        config.schedule, config.epochs * steps_per_epoch, int(config.warmup_epochs * steps_per_epoch),
        [m * steps_per_epoch for m in config.milestones]))

    training = TrainingState(model, optimizer, scheduler, objective)
    if state is not None:
        training.restore(state, context)
        if context.is_main:
            log.info("resuming %s after epoch %d of %d", run_dir, training.epoch, config.epochs)
    else:
        seed_process(config.seed, context)
    model = prepare_model(model, context.device)
    train_model = wrap_for_training(model, context)
    # The plain model is what is saved and validated; with --compile the steps run through compiled ones.
    attack_model = model
    if config.compile:
        attack_model = torch.compile(model)
        train_model = attack_model if train_model is model else torch.compile(train_model)

    metrics = MetricsLog(run_dir, training.epoch, enabled=context.is_main)
    started = time.perf_counter()
    try:
        while training.epoch < config.epochs:
            summary = _run_epoch(config, context, precision, training, train_model, attack_model, train_set,
                                 augment)
            if context.is_main:
                summary.update(_validate(config, model, val_set, precision, context))
            training.epoch += 1
            if context.is_main:
                training.history.append(summary)
                metrics.write(summary)
            # After validation: its data loader draws from rank 0's random stream.
            checkpoint = training.checkpoint(context, config=config.to_dict())
            if checkpoint is not None:
                save_checkpoint(run_dir / CHECKPOINT_NAME, checkpoint)
            if context.is_main:
                log.info(_describe(summary, config.epochs))
            context.barrier()
    finally:
        metrics.close()
    history = training.history

    test: EvalResult | None = None
    if context.is_main:
        test = _test(config, model, data.test, precision)
        metadata = {
            # What it was trained to resist: eps 0 for standard and noise training, whatever --eps said.
            "threat": {"norm": config.norm, "eps": config.trained_threat.eps}, "recipe": config.recipe(),
            "source_data": config.dataset, "input_size": data.image_size, "accuracies": {"test": test.to_dict()},
            "software": f"robust-transfer {__version__}",
        }
        save_model(model.cpu(), run_dir / MODEL_NAME, metadata)
        atomic_write_text(run_dir / RESULTS_NAME, json.dumps({
            "config": config.to_dict(), "test": test.to_dict(), "history": history,
            "train_seconds": sum(h["seconds"] for h in history),
        }, indent=2))
    context.barrier()
    return PretrainResult(run_dir, run_dir / MODEL_NAME, test, history, time.perf_counter() - started)


def _run_epoch(config: PretrainConfig, context: DistributedContext, precision: str, training: TrainingState,
               train_model, attack_model, train_set, augment) -> dict[str, Any]:
    epoch = training.epoch
    batches = make_batches(train_set, config.batch_size, shuffle=True, seed=config.seed, epoch=epoch,
                           augment=augment, rank=context.rank, world_size=context.world_size,
                           drop_last=True, num_workers=loader_workers(config.num_workers), device=context.device,
                           decode_device=context.device if config.decode == "gpu" else None)
    bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", leave=False,
               disable=not (config.progress and context.is_main), dynamic_ncols=True)
    started = time.perf_counter()

    def after_batch(index: int, loss: torch.Tensor) -> None:
        bar.update()
        if index % 10 == 0:  # reading the loss waits for the device: not on every batch
            speed = (index + 1) * config.batch_size / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{speed:.0f}")

    def stopped(error: NonFiniteLossError, index: int) -> RobustTransferError:
        last = f"epoch {epoch}" if epoch else "none yet, no epoch finished"
        return RobustTransferError(
            f"training stopped: {error} at epoch {epoch + 1}, batch {index + 1} of {len(batches)}; "
            f"the last good checkpoint ({last}) in {config.out_dir} is intact. "
            "Lower --lr or use --precision fp32, then --resume")

    try:
        totals = run_epoch(training, batches, device=context.device, precision=precision, train_model=train_model,
                           attack_model=attack_model, after_batch=after_batch, stopped=stopped)
    finally:
        bar.close()
    seconds = time.perf_counter() - started
    seen = EpochTotals.of(all_reduce_sum(totals, context))
    return {
        "epoch": epoch + 1,
        "train_loss": seen.loss / seen.examples,
        "train_acc": seen.correct / seen.examples,
        "lr": training.optimizer.param_groups[0]["lr"],
        "images_per_s": seen.examples * training.objective.replays / seconds,
        "seconds": seconds,
    }


def _validate(config: PretrainConfig, model, val_set, precision, context) -> dict[str, Any]:
    result = evaluate(model, val_set, attack=config.validation_attack, batch_size=256, device=str(context.device),
                      precision=precision, seed=config.seed)
    out = {"val_clean_acc": result.clean_acc}
    if result.robust_acc is not None:
        out["val_robust_acc"] = result.robust_acc
    return out


def _test(config: PretrainConfig, model, test_set, precision) -> EvalResult:
    device = str(next(model.parameters()).device)
    result = evaluate(model, sample_examples(test_set, config.test_examples, config.seed), attack=config.test_attack,
                      batch_size=256, device=device, precision=precision, seed=config.seed, progress=config.progress)
    return result


def _describe(summary: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {summary['epoch']}/{epochs}", f"loss {summary['train_loss']:.4f}",
             f"train acc {summary['train_acc']:.3f}", f"val clean {summary['val_clean_acc']:.3f}"]
    if "val_robust_acc" in summary:
        parts.append(f"val robust {summary['val_robust_acc']:.3f}")
    parts.append(f"{summary['images_per_s']:.0f} img/s")
    return ", ".join(parts)


def _finished_result(run_dir: Path) -> PretrainResult:
    results = json.loads((run_dir / RESULTS_NAME).read_text())
    return PretrainResult(run_dir, run_dir / MODEL_NAME, EvalResult.from_dict(results["test"]), results["history"],
                          0.0)
