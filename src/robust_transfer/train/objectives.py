"""Training objectives: each turns a batch into the loss the optimiser minimises.

standard: L(x, y).  pgd: L(PGD(x), y), the Madry et al. min-max.  fgsm-rs: one FGSM step from a
random start with step 1.25 * eps (Wong et al., "Fast is better than free").  free: minibatch
replay (Shafahi et al.), where one backward pass yields both the weight gradient and the
perturbation's gradient, the perturbation persisting across replays and batches.  noise: L(x + n, y) with
n ~ N(0, sigma^2) per pixel, Gaussian-noise augmentation, the paper's "other notion of robustness".
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..attack import Attack, pgd
from ..errors import RobustTransferError
from ..runtime import prepare_batch
from ..threat import ThreatModel

METHODS = ("standard", "pgd", "fgsm-rs", "free", "noise")


@dataclass
class Objective:
    """Base: the standard loss. ``replays`` is how often the loop repeats each batch.

    An objective also says what its batches are: `to_device` moves one (images and labels here; a list
    of images and their box targets for detection) and `tally` counts what one step saw, so the
    engine runs any task's batches without knowing their shape.
    """

    label_smoothing: float = 0.0
    replays: int = 1

    def to_device(self, x, y, device: torch.device):
        """The batch ``(x, y)`` on ``device``, images in the model's memory layout."""
        return prepare_batch(x, device), y.to(device, non_blocking=True)

    def tally(self, outputs: torch.Tensor | None, y) -> tuple[int, torch.Tensor | None]:
        """(examples in the batch, correct predictions as a device tensor, or None for a task without them)."""
        return len(y), (outputs.argmax(1) == y).sum()

    def loss(self, model: nn.Module, attack_model: nn.Module, x: torch.Tensor,
             y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (mean loss, logits) for the batch. ``attack_model`` is the unwrapped model."""
        logits = model(self.perturb(attack_model, x, y))
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing), logits

    def perturb(self, attack_model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x

    def after_backward(self) -> None:
        """Hook run after each backward pass (free training updates its perturbation here)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """State that must survive a checkpoint for a resumed run to match an uninterrupted one."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``state_dict`` returned."""


_NO_ATTACK = Attack(ThreatModel("l2", 0.0))


@dataclass
class PGDObjective(Objective):
    """Madry et al.: the loss at the attack's last iterate (best-iterate selection is for evaluation)."""

    attack: Attack = _NO_ATTACK

    def perturb(self, attack_model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.attack(attack_model, x, y, use_best=False)


@dataclass
class FGSMRSObjective(Objective):
    """Wong et al.: one signed step of 1.25 eps (or the attack's step size) from a random start."""

    attack: Attack = _NO_ATTACK

    def perturb(self, attack_model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        threat = self.attack.threat
        step = 1.25 * threat.eps if self.attack.step_size is None else self.attack.step_size
        return pgd(attack_model, x, y, threat, steps=1, step_size=step, random_start=True, use_best=False)


@dataclass
class FreeObjective(Objective):
    """Free adversarial training: the model trains on x + delta, delta ascends on the same backward
    (step eps, or the attack's step size)."""

    attack: Attack = _NO_ATTACK
    replays: int = 4
    _delta: torch.Tensor | None = field(default=None, repr=False)
    _x: torch.Tensor | None = field(default=None, repr=False)
    _x_adv: torch.Tensor | None = field(default=None, repr=False)

    def loss(self, model: nn.Module, attack_model: nn.Module, x: torch.Tensor,
             y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._delta is None or self._delta.shape != x.shape:
            self._delta = torch.zeros_like(x, dtype=torch.float32)
        self._delta = self._delta.to(x.device)
        self._x = x
        self._x_adv = self.attack.threat.project(x.float() + self._delta, x).requires_grad_(True)
        logits = model(self._x_adv)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing), logits

    def after_backward(self) -> None:
        if self._x_adv is None or self._x_adv.grad is None:
            return
        threat = self.attack.threat
        step = threat.eps if self.attack.step_size is None else self.attack.step_size
        moved = threat.project(threat.step(self._x_adv.detach(), self._x_adv.grad, step), self._x)
        self._delta = (moved.float() - self._x.float()).detach()
        self._x_adv = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self._delta is None else {"delta": self._delta.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._delta = state.get("delta")


@dataclass
class NoiseObjective(Objective):
    """Gaussian-noise augmentation: each training image plus fresh N(0, sigma^2) noise per pixel (sigma in [0, 1]
    pixel units), clipped to the image box. The noise draws from torch's global generator, which checkpoints
    save, so a resumed run draws what an uninterrupted one does."""

    sigma: float = 0.0

    def perturb(self, attack_model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x, dtype=torch.float32).mul_(self.sigma)  # keeps x's memory layout
        return (x.float() + noise).clamp_(0, 1)


def make_objective(method: str, attack: Attack | None = None, free_replays: int = 4,
                   label_smoothing: float = 0.0, noise_sigma: float = 0.0) -> Objective:
    """Build the objective for ``method`` (one of METHODS) around ``attack``. eps = 0 makes any adversarial
    method standard; ``noise`` adds Gaussian noise of std ``noise_sigma`` and ignores the attack."""
    if method not in METHODS:
        raise RobustTransferError(f"unknown training method {method!r}: use one of {', '.join(METHODS)}")
    if method == "noise":
        if noise_sigma <= 0:
            raise RobustTransferError(f"--noise-sigma must be > 0 for noise training, got {noise_sigma}")
        return NoiseObjective(label_smoothing=label_smoothing, sigma=noise_sigma)
    if method == "standard" or attack is None or attack.threat.eps == 0:
        return Objective(label_smoothing=label_smoothing)
    if method == "pgd":
        if attack.steps < 1:
            raise RobustTransferError(f"--attack-steps must be >= 1 for pgd training, got {attack.steps}")
        return PGDObjective(label_smoothing=label_smoothing, attack=attack)
    if method == "fgsm-rs":
        return FGSMRSObjective(label_smoothing=label_smoothing, attack=attack)
    if free_replays < 1:
        raise RobustTransferError(f"--free-replays must be >= 1, got {free_replays}")
    return FreeObjective(label_smoothing=label_smoothing, attack=attack, replays=free_replays)
