"""Projected gradient descent (PGD) and FGSM over a threat model, and `Attack`, an attack as one value.

Every attack treats the model as a black box taking [0, 1] images; it runs the model in eval
mode (BatchNorm with running statistics, no dropout) with its parameters frozen and its BatchNorms
folded into their convolutions (`robust_transfer.folding`), hands all of it back afterwards and
leaves no gradient on the model's parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import RobustTransferError
from .folding import folded_batchnorm
from .parsing import parse_eps
from .threat import ThreatModel

# loss_fn(logits, y) -> per-example loss, shape [N]; the attack ascends it.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def per_example_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per example, computed in fp32 even when the logits are bf16."""
    return F.cross_entropy(logits.float(), y, reduction="none")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore each submodule's own mode after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Stop ``model``'s parameters from requiring gradients for the block, then restore those that did.

    An attack differentiates with respect to its input only. Eager autograd skips the weight gradients
    anyway, but a ``torch.compile``d model decides what its backward computes when it is traced: with
    trainable parameters it would compute (and throw away) every weight gradient of every attack step.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        yield model
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)


def _is_better(success: torch.Tensor, loss: torch.Tensor, best_success: torch.Tensor,
               best_loss: torch.Tensor) -> torch.Tensor:
    """Per example: an attack that succeeds beats one that does not; then the higher loss wins."""
    return (success & ~best_success) | ((success == best_success) & (loss > best_loss))


def _evaluate_candidates(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                         targeted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(x_adv)
        loss = loss_fn(logits, y).float()
        pred = logits.argmax(dim=1)
    success = pred == y if targeted else pred != y
    return success, (-loss if targeted else loss)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    steps: int,
    step_size: float | None = None,
    random_start: bool = True,
    restarts: int = 0,
    targeted: bool = False,
    loss_fn: LossFn | None = None,
    use_best: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Return adversarial examples inside ``threat``'s eps-ball around ``x`` and the [0, 1] box.

    ``x`` holds images in [0, 1] (NCHW, any float dtype and memory layout); ``y`` the true labels,
    or the target labels when ``targeted``. ``step_size`` defaults to 2.5 * eps / steps (pixel
    units). ``restarts`` adds that many extra runs from fresh random starts; per example the worst
    case over all runs is kept (a successful attack first, then the highest loss). ``use_best``
    keeps the best iterate of each run rather than the last. ``loss_fn(logits, y)`` replaces the
    per-example cross-entropy (the attack maximises it, or minimises it when ``targeted``).
    """
    if steps < 0 or restarts < 0:
        raise RobustTransferError(f"steps and restarts must be >= 0, got steps={steps}, restarts={restarts}")
    loss_fn = loss_fn or per_example_cross_entropy
    if threat.eps == 0 or steps == 0 and not random_start:
        return x.detach().clone()
    step_size = threat.default_step_size(steps) if step_size is None else float(step_size)
    x = x.detach()
    sign = -1.0 if targeted else 1.0

    expand = (-1,) + (1,) * (x.dim() - 1)
    with eval_mode(model), frozen_parameters(model), folded_batchnorm(model):
        if use_best:
            # The unperturbed input competes too: an attack never reports a worse point than x.
            best_success, best_loss = _evaluate_candidates(model, x, y, loss_fn, targeted)
        else:
            best_success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
            best_loss = torch.full((len(x),), -torch.inf, device=x.device)
        best_x = x.clone()

        def keep_better(candidate: torch.Tensor, success: torch.Tensor, signed_loss: torch.Tensor) -> None:
            nonlocal best_x, best_success, best_loss
            better = _is_better(success, signed_loss, best_success, best_loss)
            best_x = torch.where(better.view(expand), candidate, best_x)
            best_success = best_success | success
            best_loss = torch.where(better, signed_loss, best_loss)

        for _run in range(restarts + 1):
            x_adv = threat.random_start(x, generator) if random_start else x.clone()
            for _step in range(steps):
                x_adv.requires_grad_(True)
                logits = model(x_adv)
                loss = loss_fn(logits, y).float()
                (grad,) = torch.autograd.grad(sign * loss.sum(), x_adv)
                x_adv = x_adv.detach()
                if use_best:
                    # This iterate's loss comes free with the forward pass we needed anyway.
                    pred = logits.detach().argmax(dim=1)
                    keep_better(x_adv, pred == y if targeted else pred != y, sign * loss.detach())
                x_adv = threat.project(threat.step(x_adv, grad, step_size), x)
            if not use_best and restarts == 0:
                # A single run without best-iterate tracking returns its last iterate: no scoring
                # pass needed (this is the training attack, where that pass cost ~5% of a step).
                return x_adv.detach()
            keep_better(x_adv, *_evaluate_candidates(model, x_adv, y, loss_fn, targeted))
    return best_x.detach()


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    step_size: float | None = None,
    random_start: bool = False,
    targeted: bool = False,
    loss_fn: LossFn | None = None,
) -> torch.Tensor:
    """One-step PGD: a single step of ``step_size`` (default eps) in the steepest direction."""
    return pgd(model, x, y, threat, steps=1, step_size=threat.eps if step_size is None else step_size,
               random_start=random_start, targeted=targeted, loss_fn=loss_fn, use_best=False)


ATTACK_KINDS = ("pgd", "autoattack", "apgd", "apgd-ce", "apgd-t", "square")
"""The attacks an `Attack` value can name: our PGD (training and evaluation), and AutoAttack (APGD-CE, APGD-T,
FAB-T, Square), its fast part ``apgd`` (APGD-CE + APGD-T) or one of its attacks alone, for evaluation
(`robust_transfer.autoattack.perturb`)."""
APGD_STEPS = 100
"""AutoAttack's reference iterations for APGD and FAB: the default ``steps`` of its kinds."""
_KIND_NAMES = {"pgd": "PGD", "autoattack": "AutoAttack", "apgd": "APGD-CE + APGD-T", "apgd-ce": "APGD-CE",
               "apgd-t": "APGD-T", "square": "Square"}


@dataclass(frozen=True)
class Attack:
    """One attack as a value, handed around whole: where it may move (``threat``) and how it searches.

    ``steps`` PGD steps of ``step_size`` (pixel units; default 2.5 * eps / steps) from a random start in
    the ball (``random_start``), repeated from ``restarts`` more random starts, keeping per example the
    worst case over all runs. ``kind`` names the attack (`ATTACK_KINDS`); for AutoAttack's kinds ``steps``
    are APGD's and FAB's iterations (100 in the reference) and ``restarts`` extra restarts of each.
    Evaluation, the gradient-masking checks, the training objectives, both run configurations and the
    study spec all take this one value.
    """

    threat: ThreatModel
    steps: int = 20
    step_size: float | None = None
    restarts: int = 0
    random_start: bool = True
    kind: str = "pgd"

    def __post_init__(self) -> None:
        if not isinstance(self.threat, ThreatModel):
            raise RobustTransferError(f"an attack needs a ThreatModel, got {type(self.threat).__name__}")
        if self.kind not in ATTACK_KINDS:
            raise RobustTransferError(f"unknown attack {self.kind!r}: use one of {', '.join(ATTACK_KINDS)}")
        for name in ("steps", "restarts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RobustTransferError(f"attack {name} must be a whole number >= 0, got {value!r}")
        if self.step_size is not None:
            object.__setattr__(self, "step_size", parse_eps(self.step_size))

    @classmethod
    def of(cls, norm: str, eps: float | str, **settings: Any) -> Attack:
        """``Attack(ThreatModel(norm, eps), **settings)``."""
        return cls(ThreatModel(norm, eps), **settings)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, use_best: bool = True,
                 generator: torch.Generator | None = None, loss_fn: LossFn | None = None,
                 targeted: bool = False) -> torch.Tensor:
        """PGD adversarial examples for ``x`` (in the ball and the [0, 1] box); ``use_best=False`` for training.

        Every kind is run by `robust_transfer.autoattack.perturb`; this runs the PGD kind only.
        """
        if self.kind != "pgd":
            raise RobustTransferError(f"{self.describe()} is an evaluation attack: run it with "
                                      "robust_transfer.autoattack.perturb (evaluate does)")
        return pgd(model, x, y, self.threat, steps=self.steps, step_size=self.step_size,
                   random_start=self.random_start, restarts=self.restarts, targeted=targeted, loss_fn=loss_fn,
                   use_best=use_best, generator=generator)

    def replace(self, **changes: Any) -> Attack:
        """A copy with ``changes`` (e.g. ``steps=100``)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """E.g. ``"PGD-20, l2 eps 1 (2 restarts)"``: how a report names the robust number it produced."""
        name = f"PGD-{self.steps}" if self.kind == "pgd" else f"{_KIND_NAMES[self.kind]} ({self.steps} steps)"
        text = f"{name}, {self.threat.norm} eps {self.threat.eps:g}"
        return text + (f" ({self.restarts} restarts)" if self.restarts else "")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"norm", "eps", "steps", "step_size", "restarts", "random_start", "kind"}``."""
        return {"norm": self.threat.norm, "eps": self.threat.eps, "steps": self.steps, "step_size": self.step_size,
                "restarts": self.restarts, "random_start": self.random_start, "kind": self.kind}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Attack:
        """Read what `to_dict` wrote (missing fields take their defaults); unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise RobustTransferError(f"an attack must be a table of settings, got {data!r}")
        unknown = sorted(set(data) - {"norm", "eps", "steps", "step_size", "restarts", "random_start", "kind"})
        if unknown:
            raise RobustTransferError(f"unknown attack settings: {', '.join(unknown)}")
        settings = {k: v for k, v in data.items() if k not in ("norm", "eps")}
        return cls(ThreatModel(data.get("norm", "l2"), data.get("eps", 0.0)), **settings)
