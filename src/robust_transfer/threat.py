"""Threat models: the eps-ball around an input, intersected with the [0, 1] pixel box.

Pure tensor math, no model. eps is always measured in [0, 1] pixel units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import RobustTransferError
from .parsing import parse_eps

NORMS = ("l2", "linf")


def _flat_norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example norm of ``t`` as a tensor shaped [N, 1, 1, ...] for broadcasting."""
    flat = t.flatten(1).float()
    values = flat.norm(p=2, dim=1) if norm == "l2" else flat.abs().amax(dim=1)
    return values.view(-1, *([1] * (t.dim() - 1)))


@dataclass(frozen=True)
class ThreatModel:
    """An Lp ball of radius ``eps`` (in [0, 1] pixel units) around each input.

    ``norm`` is ``"l2"`` or ``"linf"``; ``eps`` may be given as a number or a string such as
    ``"8/255"``. ``eps = 0`` is the standard (non-adversarial) setting.
    """

    norm: str
    eps: float

    def __post_init__(self) -> None:
        norm = str(self.norm).lower().replace("_", "")
        norm = {"2": "l2", "inf": "linf", "l-inf": "linf"}.get(norm, norm)
        if norm not in NORMS:
            raise RobustTransferError(f"unknown norm {self.norm!r}: use one of {', '.join(NORMS)}")
        object.__setattr__(self, "norm", norm)
        object.__setattr__(self, "eps", parse_eps(self.eps))

    def __str__(self) -> str:
        return f"{self.norm}(eps={self.eps:g})"

    def norm_of(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-example norm of a perturbation, shape [N]."""
        return _flat_norm(delta, self.norm).flatten()

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Project ``x_adv`` onto the eps-ball around ``x`` and then into the [0, 1] box.

        For Linf the box clamp keeps the point inside the ball (both are boxes); for L2 the
        ball projection scales the perturbation, and clamping to the box only shrinks it, so
        the result lies in both sets.
        """
        delta = (x_adv - x).float()
        if self.norm == "linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = _flat_norm(delta, "l2")
            delta = delta * (self.eps / norms.clamp_min(1e-12)).clamp(max=1.0)
        return self._inside((x.float() + delta).clamp(0.0, 1.0), x)

    @staticmethod
    def _inside(candidate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Cast ``candidate`` to x's dtype, rounding each element towards x.

        In bf16 or fp16 plain rounding could push a point just outside the ball; rounding
        towards x only shrinks each coordinate of the perturbation, so ball and box still hold.
        """
        stored = candidate.to(x.dtype)
        if x.dtype in (torch.float32, torch.float64):
            return stored
        grew = (stored.float() - x.float()).abs() > (candidate.float() - x.float()).abs()
        return torch.where(grew, torch.nextafter(stored, x), stored)

    def random_start(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A point drawn uniformly from the eps-ball around ``x`` (then clamped into the box)."""
        shape = x.shape
        if self.norm == "linf":
            noise = (torch.rand(shape, generator=generator, device=x.device) * 2 - 1) * self.eps
        else:
            # Uniform in the L2 ball: a Gaussian direction and radius eps * U^(1/d).
            direction = torch.randn(shape, generator=generator, device=x.device)
            direction = direction / _flat_norm(direction, "l2").clamp_min(1e-12)
            dims = x[0].numel()
            u = torch.rand((shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device)
            noise = direction * self.eps * u.pow(1.0 / dims)
        return self.project(x.float() + noise, x)

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, step_size: float) -> torch.Tensor:
        """One normalised steepest-ascent step of length ``step_size`` in this norm (unprojected)."""
        grad = grad.float()
        if self.norm == "linf":
            direction = grad.sign()
        else:
            direction = grad / _flat_norm(grad, "l2").clamp_min(1e-12)
        return x_adv.float() + step_size * direction

    def default_step_size(self, steps: int) -> float:
        """The usual 2.5 * eps / steps (Madry et al.), so PGD can cross the ball and come back."""
        return 2.5 * self.eps / max(int(steps), 1)

