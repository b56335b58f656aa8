"""Clean and robust accuracy of any model that takes [0, 1] images."""

from __future__ import annotations

import logging

from torch import nn

from .accuracy import EvalData, EvalResult, accuracy
from .masking import DEFAULT_EXAMPLES, masking_checks
from .runtime import resolve_device, resolve_precision
from .threat import ThreatModel

log = logging.getLogger(__name__)

__all__ = ["EvalData", "EvalResult", "evaluate"]


def evaluate(
    model: nn.Module,
    data: EvalData,
    threat: ThreatModel | None = None,
    steps: int = 20,
    step_size: float | None = None,
    restarts: int = 0,
    batch_size: int = 256,
    random_start: bool = True,
    device: str = "auto",
    precision: str = "fp32",
    max_examples: int | None = None,
    progress: bool = False,
    seed: int = 0,
    masking_check: bool = False,
) -> EvalResult:
    """Clean accuracy and, given ``threat``, accuracy under a PGD attack of ``steps`` steps.

    ``data`` is a DataLoader, a Dataset or an ``(images, labels)`` pair; images in [0, 1].
    ``precision`` is ``"fp32"`` (the reference) or ``"bf16"``/``"auto"`` (faster on AMX CPUs and
    GPUs). Attacks are seeded by ``seed`` so repeated evaluations agree.

    With ``masking_check`` (and a ``threat``), cheap gradient-masking checks run on the first
    examples (:func:`robust_transfer.masking.masking_checks`, about 10x the cost of evaluating
    256 examples); their warnings go to ``EvalResult.warnings`` and to the log.
    """
    torch_device = resolve_device(device)
    param = next(model.parameters(), None)
    if param is not None and param.device != torch_device:
        model = model.to(torch_device)
    result = accuracy(model, data, threat, steps=steps, step_size=step_size, restarts=restarts,
                      batch_size=batch_size, random_start=random_start, device=str(torch_device),
                      precision=precision, max_examples=max_examples, progress=progress, seed=seed)
    if masking_check and threat is not None and threat.eps > 0:
        result.warnings = masking_checks(
            model, data, threat, steps=steps, step_size=step_size, restarts=restarts, random_start=random_start,
            batch_size=batch_size, device=str(torch_device), precision=resolve_precision(precision, torch_device),
            max_examples=min(DEFAULT_EXAMPLES, result.n), seed=seed)
        for warning in result.warnings:
            log.warning(warning)
    return result
