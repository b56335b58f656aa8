"""Fine-tuning a source model with a new head on the training engine: full network, partial (first K stages
frozen, their BatchNorm kept in eval mode), or the head alone through the frozen network (the paper's
fixed-feature protocol).

With a ``checkpoint`` path, the state after every epoch (weights, optimiser, schedule, random
state) is written there atomically, with `robust_transfer.train.checkpoint`'s helpers; a
checkpoint already there is continued from, so an interrupted fine-tuning ends exactly where an
uninterrupted one would. One that holds the last epoch is a finished fine-tuning: it is loaded,
not retrained.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import make_batches
from ..errors import RobustTransferError
from ..models.stages import FrozenInfo, freeze_stages, set_train_mode
from ..runtime import prepare_model
from ..train.checkpoint import load_checkpoint, save_checkpoint
from ..train.engine import TrainingState, run_epoch
from ..train.objectives import Objective
from ..train.schedule import lr_multiplier
from ..train.step import NonFiniteLossError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneRecipe:
    """How to fine-tune: SGD with momentum, a schedule over ``epochs``, ``frozen_stages`` frozen."""

    frozen_stages: int
    epochs: int
    lr: float
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"          # "step" decays x0.1 at each third, as the paper's 150 / 50 epochs
    augment: str = "crop-flip"
    train_frozen_batchnorm: bool = False
    seed: int = 0


def _resume_state(checkpoint: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at ``checkpoint`` when there is one, after checking that the same recipe wrote it."""
    if not checkpoint.exists():
        return None
    state = load_checkpoint(checkpoint)
    if state.get("identity") != identity:
        saved = state.get("identity") or {}
        differing = sorted(k for k in {*saved, *identity} if saved.get(k) != identity.get(k))
        raise RobustTransferError(
            f"cannot continue {checkpoint}: it was written by a different fine-tuning (differs in "
            f"{', '.join(differing)}); use the original settings, or delete it to start afresh")
    return state


def finetune(model: nn.Module, train_set, recipe: FinetuneRecipe, device: torch.device, precision: str,
             progress: bool = False, description: str = "fine-tune", checkpoint: Path | None = None,
             identity: Mapping[str, Any] | None = None) -> tuple[nn.Module, dict]:
    """Train ``model`` (its new head already in place) on ``train_set``; return it and timings.

    ``checkpoint``: write the state there after every epoch and continue from a checkpoint already
    there, which must have been written with the same ``recipe`` and ``identity`` (what else makes
    the run: source model, data; checkpoint-safe values such as strings and numbers).
    """
    info: FrozenInfo = freeze_stages(model, recipe.frozen_stages,
                                     train_frozen_batchnorm=recipe.train_frozen_batchnorm)
    model = prepare_model(model, device, precision)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    steps_per_epoch = len(make_batches(train_set, recipe.batch_size, shuffle=True, drop_last=True))
    if steps_per_epoch == 0:
        raise RobustTransferError(f"the training split is smaller than one batch ({recipe.batch_size})")
    total = recipe.epochs * steps_per_epoch
    milestones = [total // 3, 2 * total // 3] if recipe.schedule == "step" else []
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(recipe.schedule, total, 0, milestones))
    torch.manual_seed(recipe.seed)
    identity = {"recipe": dataclasses.asdict(recipe), **(identity or {})}
    state = _resume_state(checkpoint, identity) if checkpoint is not None else None
    training = TrainingState(model, optimizer, scheduler, Objective())
    earlier_seconds = 0.0
    if state is not None:
        training.restore(state)
        earlier_seconds = state["seconds"]
        log.info("%s: continuing after epoch %d of %d from %s", description, training.epoch, recipe.epochs,
                 checkpoint)
    started = time.perf_counter()
    bar = tqdm(total=total, initial=training.epoch * steps_per_epoch, desc=description, unit="step", leave=False,
               disable=not progress)

    def after_batch(index: int, loss: torch.Tensor) -> None:
        bar.update()
        if index % 10 == 0:  # reading the loss waits for the device: not on every batch
            bar.set_postfix(loss=f"{loss.item():.3f}")

    def stopped(error: NonFiniteLossError, index: int) -> RobustTransferError:
        kept = f"; its last finished epoch stays in {checkpoint}" if checkpoint is not None else ""
        return RobustTransferError(f"fine-tuning stopped: {error} in epoch {training.epoch + 1} at lr {recipe.lr}; "
                                   f"try a smaller learning rate{kept}")

    while training.epoch < recipe.epochs:
        batches = make_batches(train_set, recipe.batch_size, shuffle=True, seed=recipe.seed, epoch=training.epoch,
                               augment=recipe.augment, drop_last=True)
        run_epoch(training, batches, device=device, precision=precision,
                  train_mode=lambda m: set_train_mode(m, True, info), after_batch=after_batch, stopped=stopped)
        training.epoch += 1
        if checkpoint is not None:
            save_checkpoint(checkpoint, training.checkpoint(
                finished=training.epoch == recipe.epochs, identity=identity,
                seconds=earlier_seconds + time.perf_counter() - started))
    bar.close()
    model.eval()
    return model, {"seconds": earlier_seconds + time.perf_counter() - started,
                   "trainable_parameters": info.trainable, "frozen_parameters": info.frozen}
