"""Fine-tuning a source model with a new head: full network, partial (first K stages frozen), or
the head alone through the frozen network (the paper's fixed-feature protocol)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import make_batches
from ..errors import RobustTransferError
from ..models.stages import FrozenInfo, freeze_stages, set_train_mode
from ..runtime import prepare_batch, prepare_model
from ..train.objectives import Objective
from ..train.schedule import lr_multiplier
from ..train.step import NonFiniteLossError, train_step


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


def finetune(model: nn.Module, train_set, recipe: FinetuneRecipe, device: torch.device, precision: str,
             progress: bool = False, description: str = "fine-tune") -> tuple[nn.Module, dict]:
    """Train ``model`` (its new head already in place) on ``train_set``; return it and timings."""
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
    objective = Objective()
    train_mode = lambda m: set_train_mode(m, True, info)
    torch.manual_seed(recipe.seed)
    started = time.perf_counter()
    bar = tqdm(total=total, desc=description, unit="step", leave=False, disable=not progress)
    for epoch in range(recipe.epochs):
        for x, y in make_batches(train_set, recipe.batch_size, shuffle=True, seed=recipe.seed, epoch=epoch,
                                 augment=recipe.augment, drop_last=True):
            try:
                loss, _ = train_step(model, optimizer, objective, prepare_batch(x, device, precision), y.to(device),
                                     precision=precision, device=device, train_mode=train_mode)
            except NonFiniteLossError as error:
                raise RobustTransferError(f"fine-tuning stopped: {error} in epoch {epoch + 1} at lr {recipe.lr}; "
                                          "try a smaller learning rate") from None
            scheduler.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return model, {"seconds": time.perf_counter() - started, "trainable_parameters": info.trainable,
                   "frozen_parameters": info.frozen}
