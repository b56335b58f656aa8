"""Clean and robust accuracy of any model taking [0, 1] images: the measurement itself, with its batching."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .attack import Attack, eval_mode
from .autoattack import perturb
from .data.folder import FolderDataset
from .data.memory import PerItem
from .errors import RobustTransferError
from .runtime import autocast, loader_workers, prepare_batch, resolve_device, resolve_precision

EvalData = DataLoader | Dataset | tuple[torch.Tensor, torch.Tensor]


@dataclass
class EvalResult:
    """Accuracies in [0, 1]; ``robust_acc`` is None when no attack was given.

    An example counts as robust only if it is classified correctly both clean and attacked,
    so ``robust_acc <= clean_acc`` always. ``attack`` names the attack behind ``robust_acc``
    (`Attack.describe`). ``warnings`` holds the gradient-masking warnings of
    ``evaluate(..., masking_check=True)`` (see :mod:`robust_transfer.masking`); empty otherwise.
    """

    clean_acc: float
    robust_acc: float | None
    n: int
    threat: str | None
    steps: int
    restarts: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    attack: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EvalResult:
        """Read what `to_dict` wrote (records written before a field existed take its default)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def eval_batches(data: EvalData, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if len(x) != len(y):
            raise RobustTransferError(f"images and labels differ in length: {len(x)} vs {len(y)}")
        return ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size))
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset):
        # Image files decoded item by item (ImageNet's 50,000 val images) are decoded by loader workers; anything
        # else in this process, as given (a user's dataset may hold what cannot cross to a worker).
        workers = loader_workers(None) if isinstance(data, (FolderDataset, PerItem)) else 0
        return DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers,
                          generator=torch.Generator().manual_seed(0))
    raise RobustTransferError(
        f"cannot evaluate on a {type(data).__name__}: give a DataLoader, a Dataset or an (images, labels) pair"
    )


def _check_labels(y: torch.Tensor, classes: int, offset: int) -> None:
    """Labels must index the model's outputs, or the attack's loss fails with an obscure torch error."""
    bad = (y < 0) | (y >= classes)
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        raise RobustTransferError(
            f"label {int(y[index])} of example {offset + index} is outside 0..{classes - 1}, the classes this model "
            "predicts: evaluate the model on the data it was trained for, or transfer it to this data first")


def limited(batches: Iterable, max_examples: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    seen = 0
    for x, y in batches:
        if max_examples is not None:
            if seen >= max_examples:
                return
            x, y = x[: max_examples - seen], y[: max_examples - seen]
        seen += len(x)
        yield x, y


def accuracy(
    model: nn.Module,
    data: EvalData,
    attack: Attack | None = None,
    batch_size: int = 256,
    device: str = "auto",
    precision: str = "fp32",
    max_examples: int | None = None,
    progress: bool = False,
    seed: int = 0,
) -> EvalResult:
    """Clean accuracy and, given ``attack``, accuracy under it.

    ``data`` is a DataLoader, a Dataset or an ``(images, labels)`` pair; images in [0, 1].
    ``precision`` is ``"fp32"`` (the reference) or ``"bf16"``/``"auto"`` (faster on AMX CPUs and
    GPUs). Attacks are seeded by ``seed`` so repeated evaluations agree.

    `robust_transfer.evaluation.evaluate` adds the gradient-masking checks on top.
    """
    torch_device = resolve_device(device)
    precision = resolve_precision(precision, torch_device)
    generator = torch.Generator(device=torch_device).manual_seed(seed)
    param = next(model.parameters(), None)
    if param is not None and param.device != torch_device:
        model = model.to(torch_device)

    correct_clean = correct_robust = total = 0
    started = time.perf_counter()
    batches = limited(eval_batches(data, batch_size), max_examples)
    bar = tqdm(batches, desc="evaluate", unit="batch", disable=not progress, leave=False)
    for x, y in bar:
        x = prepare_batch(x.float(), torch_device)
        y = y.to(torch_device).long()
        with autocast(precision, torch_device):
            with eval_mode(model), torch.no_grad():
                logits = model(x)
            _check_labels(y, logits.shape[1], total)
            clean_pred = logits.argmax(dim=1)
            clean_ok = clean_pred == y
            correct_clean += int(clean_ok.sum())
            if attack is not None:
                x_adv = perturb(attack, model, x, y, generator=generator, seed=seed, progress=progress)
                with eval_mode(model), torch.no_grad():
                    adv_ok = model(x_adv).argmax(dim=1) == y
                correct_robust += int((clean_ok & adv_ok).sum())
        total += len(y)
        bar.set_postfix(clean=f"{correct_clean / total:.3f}",
                        robust=f"{correct_robust / total:.3f}" if attack else "-")
    if total == 0:
        raise RobustTransferError("nothing to evaluate: the data has no examples")
    seconds = time.perf_counter() - started
    return EvalResult(
        clean_acc=correct_clean / total,
        robust_acc=(correct_robust / total) if attack is not None else None,
        n=total,
        threat=str(attack.threat) if attack is not None else None,
        steps=attack.steps if attack is not None else 0,
        restarts=attack.restarts if attack is not None else 0,
        seconds=seconds,
        attack=attack.describe() if attack is not None else None,
    )
