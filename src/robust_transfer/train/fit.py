"""Train a model for some epochs on the engine, with a checkpoint after every epoch and an exact resume.

Fine-tuning a classifier and fine-tuning a detector are the same run: SGD with momentum over the
parameters that train, a schedule over all steps, one `run_epoch` per epoch with that epoch's batches,
and the state written atomically after each. What differs is handed in: the batches of an epoch, the
objective (which knows its batches' shape), and how the model enters training mode.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import RobustTransferError
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistributedContext
from .engine import ALONE, TrainingState, run_epoch
from .objectives import Objective
from .schedule import lr_multiplier
from .step import NonFiniteLossError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SGDPlan:
    """SGD with momentum for ``epochs`` of ``steps_per_epoch`` steps; ``schedule`` as `lr_multiplier` reads it
    (``step`` decays x0.1 at each third), after ``warmup_steps`` of linear warm-up."""

    epochs: int
    steps_per_epoch: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
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
            f"cannot continue {checkpoint}: it was written by a different run (differs in "
            f"{', '.join(differing)}); use the original settings, or delete it to start afresh")
    return state


def fit(model: nn.Module, batches: Callable[[int], Iterable[tuple[Any, Any]]], plan: SGDPlan, *,
        objective: Objective | None = None, device: torch.device, precision: str,
        train_mode: Callable[[nn.Module], None] | None = None, train_model: nn.Module | None = None,
        context: DistributedContext = ALONE, checkpoint: Path | None = None,
        identity: Mapping[str, Any] | None = None, progress: bool = False,
        description: str = "train") -> tuple[TrainingState, float]:
    """Train ``model`` (on ``device`` already; its trainable parameters are those with ``requires_grad``) with
    ``batches(epoch)`` for each epoch; return the final state and the seconds spent, earlier runs included.

    ``checkpoint``: write the state there after every epoch (rank 0) and continue from a checkpoint
    already there, which must carry the same ``identity`` (checkpoint-safe values: strings, numbers).
    A checkpoint holding the last epoch is a finished run: loaded, not retrained. ``train_model`` is what
    the forward runs through (a DistributedDataParallel wrapper), ``train_mode`` how it enters training.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise RobustTransferError(f"{description}: nothing to train, every parameter is frozen")
    if plan.steps_per_epoch < 1:
        raise RobustTransferError(f"{description}: an epoch has no batch; the training split is too small")
    optimizer = torch.optim.SGD(parameters, lr=plan.lr, momentum=plan.momentum, weight_decay=plan.weight_decay)
    total = plan.epochs * plan.steps_per_epoch
    milestones = [total // 3, 2 * total // 3] if plan.schedule == "step" else []
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_multiplier(plan.schedule, total, plan.warmup_steps, milestones))
    torch.manual_seed(plan.seed + context.rank)
    identity = dict(identity or {})
    state = _resume_state(checkpoint, identity) if checkpoint is not None else None
    training = TrainingState(model, optimizer, scheduler, objective or Objective())
    earlier_seconds = 0.0
    if state is not None:
        training.restore(state, context)
        earlier_seconds = state["seconds"]
        log.info("%s: continuing after epoch %d of %d from %s", description, training.epoch, plan.epochs, checkpoint)
    started = time.perf_counter()
    bar = tqdm(total=total, initial=training.epoch * plan.steps_per_epoch, desc=description, unit="step",
               leave=False, disable=not progress or not context.is_main)

    def after_batch(index: int, loss: torch.Tensor) -> None:
        bar.update()
        if index % 10 == 0:  # reading the loss waits for the device: not on every batch
            bar.set_postfix(loss=f"{loss.item():.3f}")

    def stopped(error: NonFiniteLossError, index: int) -> RobustTransferError:
        kept = f"; its last finished epoch stays in {checkpoint}" if checkpoint is not None else ""
        return RobustTransferError(f"{description} stopped: {error} in epoch {training.epoch + 1} at lr {plan.lr}; "
                                   f"try a smaller learning rate{kept}")

    while training.epoch < plan.epochs:
        run_epoch(training, batches(training.epoch), device=device, precision=precision, train_model=train_model,
                  train_mode=train_mode, after_batch=after_batch, stopped=stopped)
        training.epoch += 1
        if checkpoint is not None:
            written = training.checkpoint(context, finished=training.epoch == plan.epochs, identity=identity,
                                          seconds=earlier_seconds + time.perf_counter() - started)
            if written is not None:
                save_checkpoint(checkpoint, written)
    bar.close()
    model.eval()
    return training, earlier_seconds + time.perf_counter() - started
