"""Clean and robust accuracy of any model that takes [0, 1] images, and of a model file on a dataset."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from .accuracy import EvalData, EvalResult, accuracy
from .attack import APGD_STEPS, Attack
from .data import load_dataset, sample_examples
from .errors import RobustTransferError
from .masking import DEFAULT_EXAMPLES, masking_checks
from .models import NormalizedModel, load_model
from .runtime import resolve_device, resolve_precision
from .threat import ThreatModel

log = logging.getLogger(__name__)

__all__ = ["EvalData", "EvalResult", "evaluate", "evaluate_file"]


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
    attack: Attack | str | None = None,
) -> EvalResult:
    """Clean accuracy and, given ``threat`` or ``attack``, accuracy under a PGD attack of ``steps`` steps.

    ``attack`` (an `Attack` value) replaces ``threat``, ``steps``, ``step_size``, ``restarts`` and
    ``random_start``, which build one when it is not given; the name of a kind (``"autoattack"``,
    ``"apgd"``, ...) with a ``threat`` builds that attack (at AutoAttack's 100 iterations unless ``steps``
    says otherwise).

    ``data`` is a DataLoader, a Dataset or an ``(images, labels)`` pair; images in [0, 1].
    ``precision`` is ``"fp32"`` (the reference) or ``"bf16"``/``"auto"`` (faster on AMX CPUs and
    GPUs). Attacks are seeded by ``seed`` so repeated evaluations agree.

    With ``masking_check`` (and a ``threat``), cheap gradient-masking checks run on the first
    examples (:func:`robust_transfer.masking.masking_checks`, about 10x the cost of evaluating
    256 examples); their warnings go to ``EvalResult.warnings`` and to the log.
    """
    if isinstance(attack, str):
        if threat is None:
            raise RobustTransferError(f"attack={attack!r} needs a threat model (threat=ThreatModel(norm, eps))")
        kind_steps = steps if attack == "pgd" or steps != 20 else APGD_STEPS  # 20: the signature's default
        attack, threat = Attack(threat, steps=kind_steps, step_size=step_size, restarts=restarts,
                                random_start=random_start, kind=attack), None
    if attack is None and threat is not None:
        attack = Attack(threat, steps=steps, step_size=step_size, restarts=restarts, random_start=random_start)
    elif attack is not None and threat is not None:
        raise RobustTransferError("give either an attack or a threat model with its settings, not both")
    torch_device = resolve_device(device)
    param = next(model.parameters(), None)
    if param is not None and param.device != torch_device:
        model = model.to(torch_device)
    result = accuracy(model, data, attack, batch_size=batch_size, device=str(torch_device), precision=precision,
                      max_examples=max_examples, progress=progress, seed=seed)
    if masking_check and attack is not None and attack.threat.eps > 0:
        result.warnings = masking_checks(
            model, data, attack, batch_size=batch_size, device=str(torch_device),
            precision=resolve_precision(precision, torch_device), max_examples=min(DEFAULT_EXAMPLES, result.n),
            seed=seed)
        for warning in result.warnings:
            log.warning(warning)
    return result


def evaluate_file(
    model: str | os.PathLike[str] | NormalizedModel,
    dataset: str,
    attack: Attack | None = None,
    *,
    data_root: str | None = None,
    split: str = "test",
    max_examples: int | None = None,
    image_size: int | None = None,
    arch: str | None = None,
    options: Mapping[str, Any] | None = None,
    batch_size: int = 256,
    device: str = "auto",
    precision: str = "fp32",
    seed: int = 0,
    masking_check: bool = False,
    progress: bool = False,
) -> EvalResult:
    """Load ``model`` (a file in any supported format, a zoo name, or a loaded model) and evaluate it on
    ``split`` of ``dataset`` under ``attack``: what ``robust-transfer evaluate`` and a study's source
    evaluation both do.

    Images are decoded at ``image_size``, by default the size the model was trained at (its metadata's
    ``input_size``), with the model's channel count; ``max_examples`` evaluates a seeded random sample.
    A model that predicts another number of classes than the dataset has is a clear error.
    """
    loaded = model if isinstance(model, NormalizedModel) else load_model(model, arch, options=options)
    spec = loaded.spec
    data = load_dataset(dataset, data_root, seed=seed, image_size=image_size or loaded.metadata.get("input_size"),
                        in_channels=spec.in_channels)
    if data.num_classes != spec.num_classes:
        raise RobustTransferError(
            f"{model if not isinstance(model, nn.Module) else 'the model'} predicts {spec.num_classes} classes but "
            f"{dataset} has {data.num_classes}: evaluate it on the data it was trained for, or transfer it first")
    examples = sample_examples(getattr(data, split), max_examples, seed)
    return evaluate(loaded, examples, attack=attack, batch_size=batch_size, device=device, precision=precision,
                    seed=seed, masking_check=masking_check, progress=progress)
