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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import make_batches
from ..errors import RobustTransferError
from ..models.stages import FrozenInfo, freeze_stages, set_train_mode
from ..runtime import prepare_model
from ..train.fit import SGDPlan, fit


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
             progress: bool = False, description: str = "fine-tune", checkpoint: Path | None = None,
             identity: Mapping[str, Any] | None = None, num_workers: int = 0) -> tuple[nn.Module, dict]:
    """Train ``model`` (its new head already in place) on ``train_set``; return it and timings.

    ``checkpoint``: write the state there after every epoch and continue from a checkpoint already
    there, which must have been written with the same ``recipe`` and ``identity`` (what else makes
    the run: source model, data; checkpoint-safe values such as strings and numbers). ``num_workers``: loader
    processes for image files (streamed crops of the originals under "resized-crop-flip").
    """
    info: FrozenInfo = freeze_stages(model, recipe.frozen_stages,
                                     train_frozen_batchnorm=recipe.train_frozen_batchnorm)
    model = prepare_model(model, device)
    plan = SGDPlan(epochs=recipe.epochs, steps_per_epoch=len(make_batches(train_set, recipe.batch_size, shuffle=True,
                                                                          drop_last=True)),
                   lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                   schedule=recipe.schedule, seed=recipe.seed)
    if plan.steps_per_epoch == 0:
        raise RobustTransferError(f"the training split is smaller than one batch ({recipe.batch_size})")

    def batches(epoch: int):
        return make_batches(train_set, recipe.batch_size, shuffle=True, seed=recipe.seed, epoch=epoch,
                            augment=recipe.augment, drop_last=True, num_workers=num_workers, device=device)

    _, seconds = fit(model, batches, plan, device=device, precision=precision,
                     train_mode=lambda m: set_train_mode(m, True, info), checkpoint=checkpoint,
                     identity={"recipe": dataclasses.asdict(recipe), **(identity or {})}, progress=progress,
                     description=description)
    # Trained channels_last, handed back in the default layout: loaded from its file, the model computes bit for bit
    # what the returned one does.
    model = model.to(memory_format=torch.contiguous_format)
    return model, {"seconds": seconds, "trainable_parameters": info.trainable, "frozen_parameters": info.frozen}
