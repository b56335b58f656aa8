"""One optimiser step on one batch: forward under the chosen precision, backward, update."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import RobustTransferError
from ..runtime import autocast
from .objectives import Objective


class NonFiniteLossError(RobustTransferError):
    """The loss was NaN or infinite; the training loop adds where it happened."""


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, objective: Objective,
               x: torch.Tensor, y: torch.Tensor, *, precision: str, device: torch.device,
               attack_model: nn.Module | None = None,
               train_mode: Callable[[nn.Module], None] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run one step and return (loss, logits), both detached; logits are None for an objective without them
    (detection).

    ``model`` is what is trained (possibly wrapped for data parallelism); ``attack_model`` is the
    plain module the attack differentiates through (defaults to ``model``). ``train_mode`` puts
    the model in training mode (default ``model.train()``; transfer keeps frozen BatchNorm in eval
    mode). bf16 needs no loss scaling, so fp32 and bf16 share this path.
    """
    if train_mode is None:
        model.train()
    else:
        train_mode(model)
    with autocast(precision, device):
        loss, logits = objective.loss(model, attack_model if attack_model is not None else model, x, y)
    if not torch.isfinite(loss):
        # Checked before the update so the weights (and any checkpoint of them) stay finite.
        raise NonFiniteLossError(f"the loss became {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    objective.after_backward()
    optimizer.step()
    return loss.detach(), logits.detach() if logits is not None else None
