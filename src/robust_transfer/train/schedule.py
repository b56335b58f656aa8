"""Learning-rate schedules as multipliers of the base rate, per optimiser step."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ..errors import RobustTransferError

SCHEDULES = ("cosine", "step", "constant")


def lr_multiplier(schedule: str, total_steps: int, warmup_steps: int = 0,
                  milestones: Sequence[int] = (), gamma: float = 0.1) -> Callable[[int], float]:
    """Return f(step) -> factor for LambdaLR.

    Linear warm-up from near 0 over ``warmup_steps``; then ``cosine`` decays to 0 at
    ``total_steps``, ``step`` multiplies by ``gamma`` at each milestone (in steps) and
    ``constant`` keeps the rate.
    """
    if schedule not in SCHEDULES:
        raise RobustTransferError(f"unknown schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    milestones = sorted(int(m) for m in milestones)

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            span = max(total_steps - warmup_steps, 1)
            progress = min((step - warmup_steps) / span, 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "step":
            return gamma ** sum(step >= m for m in milestones)
        return 1.0

    return factor
