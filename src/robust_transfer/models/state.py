"""Comparing a state dict with a model's: which keys are missing, unexpected or of the wrong shape."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import RobustTransferError

_SHOWN_KEYS = 4


def few(keys: list[str]) -> str:
    """A few keys spread evenly over the list (first and last included), and how many there are."""
    if len(keys) <= _SHOWN_KEYS:
        return ", ".join(keys)
    picks = sorted({round(i * (len(keys) - 1) / (_SHOWN_KEYS - 1)) for i in range(_SHOWN_KEYS)})
    return ", ".join(keys[i] for i in picks) + f" ({len(keys)} in all)"


def signature(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor."""
    return {name: tuple(t.shape) for name, t in state.items()}


def misfit(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    """What keeps ``state`` from loading where ``expected`` is (missing, unexpected, wrong-shape keys); None if it
    fits."""
    missing = [k for k in expected if k not in state]
    unexpected = sorted(k for k in state if k not in expected)
    wrong = [
        f"{k} (file {list(state[k].shape)}, model {list(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {few(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {few(wrong)}")
    return "; ".join(problems) or None


def check_state_dict_fits(model: nn.Module, state: Mapping[str, torch.Tensor], source: str, arch: str) -> None:
    """Raise a `RobustTransferError` naming a few missing, unexpected and wrong-shape keys, if any."""
    problems = misfit(model.state_dict(), state)
    if problems is None:
        return
    raise RobustTransferError(
        f"the weights in {source} do not fit architecture {arch!r}; {problems}. Pass the architecture the file was "
        "saved from (arch=...) or check its JSON spec"
    )
