"""Predictions of a model over a dataset, in eval mode, batched."""

from __future__ import annotations

import torch
from torch import nn

from ..attack import eval_mode
from ..data import make_batches
from ..runtime import autocast, prepare_batch


@torch.no_grad()
def predict(model: nn.Module, dataset, device: torch.device, precision: str,
            batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels, true labels) for every example of ``dataset``, in order."""
    predictions, labels = [], []
    with eval_mode(model), autocast(precision, device):
        for x, y in make_batches(dataset, batch_size, shuffle=False):
            predictions.append(model(prepare_batch(x, device)).argmax(1).cpu())
            labels.append(y)
    return torch.cat(predictions), torch.cat(labels)
