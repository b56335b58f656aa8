"""The one training engine under pretraining, fine-tuning and every task that comes next.

`TrainingState` is what a run needs to continue exactly: model, optimiser, schedule, objective (free
training's perturbation), the epochs done with their history, and every process's random stream. It
saves itself atomically and restores itself per rank. `run_epoch` trains one epoch of batches through
the objective, one `train_step` per batch and replay; the loss and accuracy totals stay on the device
and are read once, at the end of the epoch. What differs between tasks is a hook, not another loop:
pretraining adds data parallelism, validation and metrics around it; fine-tuning adds frozen stages
(``train_mode``); a new task adds an objective.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import RobustTransferError
from .checkpoint import restore_rng_state, rng_state
from .distributed import DistributedContext, gather_to_all
from .objectives import Objective
from .step import NonFiniteLossError, train_step

log = logging.getLogger(__name__)

ALONE = DistributedContext()
"""A run in one process."""


@dataclass
class TrainingState:
    """Everything that changes while a model trains, with ``epoch`` epochs done."""

    model: nn.Module                # the plain module: what is saved, and what attacks differentiate through
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    objective: Objective
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def checkpoint(self, context: DistributedContext = ALONE, *, finished: bool = False,
                   **extra: Any) -> dict[str, Any] | None:
        """The checkpoint to write (`robust_transfer.train.checkpoint.save_checkpoint`) on rank 0, None elsewhere;
        every rank must call it, since it gathers their states.

        Each process's random stream and objective state go under ``ranks``, so a resumed torchrun run
        continues each process exactly. A ``finished`` run keeps no optimiser or schedule: it will not step
        again, and its checkpoint stays small. ``extra`` entries (the recipe that wrote it) are stored too.
        """
        ranks = gather_to_all({"objective": self.objective.state_dict(), "rng": rng_state()}, context)
        if not context.is_main:
            return None
        state = {"epoch": self.epoch, "model": self.model.state_dict(), **ranks[0], "ranks": ranks,
                 "history": self.history, **extra}
        if not finished:
            state.update(optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict())
        return state

    def restore(self, state: dict[str, Any], context: DistributedContext = ALONE) -> None:
        """Continue from a checkpoint `save` wrote: weights, optimiser and schedule (when kept), this process's
        objective state and random stream, epochs done and history."""
        self.model.load_state_dict(state["model"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        own = _own_state(state, context)
        self.objective.load_state_dict(own.get("objective", {}))
        restore_rng_state(own["rng"])
        self.epoch, self.history = state["epoch"], list(state.get("history", []))


def _own_state(state: dict[str, Any], context: DistributedContext) -> dict[str, Any]:
    """This process's random stream and objective state from a checkpoint.

    Checkpoints from before per-rank states, or from a run with another number of processes, give
    every process rank 0's: the run continues, but not exactly as it would have.
    """
    ranks = state.get("ranks") or []
    if len(ranks) == context.world_size:
        return ranks[context.rank]
    if context.is_main and context.active:
        log.warning("the checkpoint was written by %d process(es), this run has %d: every process continues "
                    "from rank 0's random state, so the result will differ slightly from an uninterrupted run",
                    max(len(ranks), 1), context.world_size)
    return {"objective": state.get("objective", {}), "rng": state["rng"]}


@dataclass
class EpochTotals:
    """What one epoch saw on this process: summed loss (per example), correct predictions, examples."""

    loss: float
    correct: float
    examples: float

    @classmethod
    def of(cls, totals: torch.Tensor) -> EpochTotals:
        loss, correct, examples = totals.tolist()
        return cls(loss, correct, examples)


def run_epoch(
    state: TrainingState,
    batches: Iterable[tuple[Any, Any]],
    *,
    device: torch.device,
    precision: str,
    train_model: nn.Module | None = None,
    attack_model: nn.Module | None = None,
    train_mode: Callable[[nn.Module], None] | None = None,
    after_batch: Callable[[int, torch.Tensor], None] | None = None,
    stopped: Callable[[NonFiniteLossError, int], RobustTransferError] | None = None,
) -> torch.Tensor:
    """Train one epoch: for each batch, ``objective.replays`` steps, each followed by a schedule step.

    ``train_model`` is what the optimiser's forward runs through (a DDP wrapper; default the state's
    model); ``attack_model`` is what the objective's attack runs through (a compiled model; default the state's
    model); ``train_mode`` puts it in training mode (fine-tuning keeps frozen BatchNorm in eval mode).
    ``after_batch(index, loss)`` sees each batch's detached loss (progress bars). A NaN or infinite loss
    stops before the update; ``stopped(error, batch index)`` turns it into the error the caller raises.
    Returns the totals ``[loss * n, correct, n]`` as a float64 tensor on ``device``, summed on device:
    reduce them across processes and read them once per epoch (``correct`` stays 0 for a task without
    accuracy). The objective moves each batch and counts it, so batches may be any task's.
    ``state.epoch`` is the caller's to advance.
    """
    model = state.model
    objective = state.objective
    # `is None`, not `or`: a compiled module refuses to be asked for its truth value.
    train_model = model if train_model is None else train_model
    attack_model = model if attack_model is None else attack_model
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    nothing = totals.new_zeros(())
    for index, (x, y) in enumerate(batches):
        x, y = objective.to_device(x, y, device)
        for _replay in range(state.objective.replays):
            try:
                loss, logits = train_step(train_model, state.optimizer, objective, x, y,
                                          precision=precision, device=device, attack_model=attack_model,
                                          train_mode=train_mode)
            except NonFiniteLossError as error:
                raise (stopped(error, index) if stopped is not None else error) from None
            state.scheduler.step()
        n, correct = objective.tally(logits, y)
        totals += torch.stack([loss.double() * n, correct.double() if correct is not None else nothing,
                               torch.tensor(float(n), dtype=torch.float64, device=device)])
        if after_batch is not None:
            after_batch(index, loss)
    return totals
