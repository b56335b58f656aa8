"""Cheap sanity checks for gradient masking: signs that a PGD number overstates robustness.

A model can look robust because PGD's gradients are useless on it (non-differentiable layers,
quantisation, saturated softmax, randomness) rather than because it is robust; the attack then
fails for the wrong reason (Athalye et al. 2018, Carlini et al. 2019). The checks here run a few
extra attacks on a small subset and compare them with what any sound attack must show:

* robust accuracy does not rise as eps grows, and an attack that may reach any image in the
  [0, 1] box ("unbounded") drives it to about zero. (Accuracy at 2*eps that stays near clean is
  not flagged by itself: a robust model at a small eps shows exactly that.);
* starting PGD from a random point or from the input gives about the same accuracy;
* five times as many steps hardly lower it further (otherwise the attack has not converged);
* the loss has a non-zero gradient with respect to the input.

``masking_checks`` measures and returns warnings; ``judge`` holds the rules alone, so they can be
read and tested without a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .accuracy import accuracy, eval_batches, limited
from .attack import Attack, eval_mode, per_example_cross_entropy
from .autoattack import perturb
from .data import sample_examples
from .errors import RobustTransferError
from .runtime import resolve_device
from .threat import ThreatModel

# Differences in accuracy (fractions of the subset) above which a check fires.
MONOTONE_TOLERANCE = 0.02  # accuracy at a larger eps may not beat a smaller eps by more than this
UNBOUNDED_MAX_ACC = 0.10  # an attack that can reach any image should leave at most this correct
RANDOM_START_GAP = 0.05
MORE_STEPS_GAP = 0.05
STEPS_FACTOR = 5
ZERO_GRADIENT_MAX_FRACTION = 0.10
GRADIENT_FREE_GAP = 0.05  # a gradient-free attack may not beat the gradient attack by more than this
GRADIENT_FREE_QUERIES = 1000  # Square's budget in the check (AutoAttack itself uses 5,000)
DEFAULT_EXAMPLES = 256


@dataclass
class MaskingMeasurements:
    """Accuracies in [0, 1] on one subset of ``n`` examples (robust means correct clean and attacked)."""

    n: int
    clean_acc: float
    eps: float
    by_eps: dict[float, float]  # eps -> robust accuracy with the asked attack (eps/2, eps, 2*eps)
    unbounded_eps: float
    unbounded_acc: float
    no_random_start_acc: float | None  # at eps, PGD started at the input (None: not measured)
    random_start_acc: float | None  # at eps, PGD from a random point of the ball (None: not measured)
    steps: int
    more_steps: int
    more_steps_acc: float | None  # at eps with ``more_steps`` steps (None: not measured)
    zero_gradient_fraction: float  # share of examples whose loss gradient w.r.t. the input is exactly zero
    gradient_free_acc: float | None = None  # at eps under Square, which needs no gradient (None: not measured)
    attack: str = "the attack"  # how the asked attack is named in the warnings


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def judge(m: MaskingMeasurements, threat: ThreatModel) -> list[str]:
    """Turn measurements into warnings: one plain sentence per symptom, saying what to do about it."""
    warnings: list[str] = []
    subset = f"(on {m.n} examples)"

    ordered = sorted(m.by_eps.items())
    for (small_eps, small_acc), (big_eps, big_acc) in zip(ordered, ordered[1:], strict=False):
        if big_acc > small_acc + MONOTONE_TOLERANCE:
            warnings.append(
                f"possible gradient masking: robust accuracy rises with eps ({_pct(small_acc)} at eps={small_eps:g}, "
                f"{_pct(big_acc)} at eps={big_eps:g}) {subset}; a larger ball contains the smaller one, so a working "
                "attack can only do better there. Check the model for non-differentiable or randomised layers and "
                "try more steps and restarts.")
            break

    if m.unbounded_acc > UNBOUNDED_MAX_ACC:
        warnings.append(
            f"likely gradient masking: an attack allowed to reach any image ({threat.norm} eps={m.unbounded_eps:g}, "
            f"the whole [0, 1] box) still leaves {_pct(m.unbounded_acc)} correct {subset}; it should reach about 0%. "
            "The reported robust accuracy is not trustworthy: find the layer that blocks gradients, or evaluate "
            "with an attack that does not need them.")

    if m.random_start_acc is not None and m.no_random_start_acc is not None:
        gap = m.no_random_start_acc - m.random_start_acc
        rs, nors = _pct(m.random_start_acc), _pct(m.no_random_start_acc)
        if gap > RANDOM_START_GAP:
            warnings.append(
                f"possible gradient masking: PGD from a random start leaves {rs} correct but PGD started at the "
                f"input leaves {nors} {subset}; the gradient at the clean input is less useful than the one nearby, "
                "a typical sign of masked gradients. Keep the random start, add restarts (--restarts), and check "
                "the model for non-differentiable or randomised layers.")
        elif -gap > RANDOM_START_GAP:
            warnings.append(
                f"the random start weakens the attack: PGD started at the input leaves {nors} correct but PGD from "
                f"a random start leaves {rs} {subset}, so a random-start number overstates robustness. Evaluate "
                "also without the random start or with several restarts (--restarts), and report the lowest "
                "accuracy.")

    if m.more_steps_acc is not None and m.by_eps[m.eps] - m.more_steps_acc > MORE_STEPS_GAP:
        steps = f"{m.steps} step{'' if m.steps == 1 else 's'}"
        warnings.append(
            f"the attack has not converged: {m.more_steps} steps give robust accuracy {_pct(m.more_steps_acc)} "
            f"against {_pct(m.by_eps[m.eps])} with {steps} {subset}. Use more steps (at least {m.more_steps}) "
            "so the reported number is not an overestimate.")

    # Against the longer attack too: a gap that more steps close is an unconverged attack (above), not masking.
    gradient_acc = min(a for a in (m.by_eps[m.eps], m.more_steps_acc) if a is not None)
    if m.gradient_free_acc is not None and gradient_acc - m.gradient_free_acc > GRADIENT_FREE_GAP:
        warnings.append(
            f"likely gradient masking: Square, an attack that uses no gradient, leaves {_pct(m.gradient_free_acc)} "
            f"correct where {m.attack} leaves {_pct(gradient_acc)} {subset}; the gradient misleads the attack. "
            "Report robust accuracy under AutoAttack (--attack autoattack), which includes Square.")

    if m.zero_gradient_fraction > ZERO_GRADIENT_MAX_FRACTION:
        warnings.append(
            f"likely gradient masking: the loss gradient with respect to the input is exactly zero for "
            f"{_pct(m.zero_gradient_fraction)} of the examples {subset}, so PGD cannot move them. A "
            "non-differentiable operation (rounding, quantisation, argmax, .detach()) or a saturated softmax "
            "blocks the gradient: remove it for evaluation, replace it by a differentiable approximation (BPDA), "
            "or attack with a margin loss.")
    return warnings


def _subset(data, max_examples: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for x, y in limited(eval_batches(data, batch_size), max_examples):
        xs.append(x.detach().cpu())
        ys.append(torch.as_tensor(y).detach().cpu())
    if not xs:
        raise RobustTransferError("nothing to check: the data has no examples")
    return torch.cat(xs).float(), torch.cat(ys).long()


def unbounded_eps(threat: ThreatModel, example_shape: torch.Size | tuple[int, ...]) -> float:
    """The smallest eps whose ball around any image covers the whole [0, 1] box."""
    return 1.0 if threat.norm == "linf" else math.sqrt(math.prod(example_shape))


def _zero_gradient_fraction(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                            batch_size: int) -> float:
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    zero = 0
    with eval_mode(model):
        for start in range(0, len(x), batch_size):
            xb = x[start:start + batch_size].to(device, dtype).requires_grad_(True)
            yb = y[start:start + batch_size].to(device)
            loss = per_example_cross_entropy(model(xb), yb)
            (grad,) = torch.autograd.grad(loss.sum(), xb, allow_unused=True)
            if grad is None:
                zero += len(xb)
            else:
                zero += int((grad.flatten(1).abs().amax(dim=1) == 0).sum())
    return zero / len(x)


def measure(
    model: nn.Module,
    data,
    attack: Attack,
    batch_size: int = 256,
    device: str = "auto",
    precision: str = "fp32",
    max_examples: int = DEFAULT_EXAMPLES,
    seed: int = 0,
    more_steps: bool = True,
) -> MaskingMeasurements:
    """Run the extra attacks on ``max_examples`` examples of ``data`` (a seeded sample of a Dataset): variations of
    ``attack`` (its eps halved and doubled, unbounded, the other random start, 5x the steps)."""
    threat, steps, step_size, random_start = attack.threat, attack.steps, attack.step_size, attack.random_start
    if threat.eps <= 0:
        raise RobustTransferError("the gradient-masking checks need a threat model with eps > 0")
    if isinstance(data, Dataset):  # a random sample: many datasets store their examples class by class
        data = sample_examples(data, max_examples, seed)
    x, y = _subset(data, max_examples, batch_size)
    torch_device = resolve_device(device)
    param = next(model.parameters(), None)
    if param is not None and param.device != torch_device:
        model = model.to(torch_device)

    def acc(eps: float, n_steps: int = steps, size: float | None = step_size, start: bool = random_start) -> float:
        variant = attack.replace(threat=ThreatModel(threat.norm, eps), steps=n_steps, step_size=size,
                                 random_start=start)
        result = accuracy(model, (x, y), variant, batch_size=batch_size, device=str(torch_device),
                          precision=precision, seed=seed)
        return result.robust_acc

    clean = accuracy(model, (x, y), batch_size=batch_size, device=str(torch_device), precision=precision).clean_acc
    # A fixed step size is scaled with eps, so every ball gets the same relative attack.
    scaled = (lambda factor: None if step_size is None else step_size * factor)
    by_eps = {threat.eps / 2: acc(threat.eps / 2, size=scaled(0.5)), threat.eps: acc(threat.eps),
              threat.eps * 2: acc(threat.eps * 2, size=scaled(2.0))}
    big = unbounded_eps(threat, x.shape[1:])
    unbounded = acc(big, size=None)
    other_start = acc(threat.eps, start=not random_start)
    with_rs, without_rs = (by_eps[threat.eps], other_start) if random_start else (other_start, by_eps[threat.eps])
    longer = STEPS_FACTOR * max(steps, 1)
    # With the default step size (2.5 eps / steps) more steps means shorter steps over the same path length;
    # with a fixed step size the longer attack walks 5x as far.
    more = acc(threat.eps, n_steps=longer) if more_steps else None
    zero = _zero_gradient_fraction(model, x, y, torch_device, batch_size)
    gradient_free = None
    if attack.kind not in ("autoattack", "square"):  # those already include Square
        x_device, y_device = x.to(torch_device), y.to(torch_device)
        x_square = perturb(attack.replace(kind="square"), model, x_device, y_device, seed=seed,
                           square_queries=GRADIENT_FREE_QUERIES)
        with eval_mode(model), torch.no_grad():
            clean_ok = model(x_device).argmax(1) == y_device
            gradient_free = float((clean_ok & (model(x_square).argmax(1) == y_device)).float().mean())
    return MaskingMeasurements(
        n=len(y), clean_acc=clean, eps=threat.eps, by_eps=by_eps, unbounded_eps=big, unbounded_acc=unbounded,
        no_random_start_acc=without_rs, random_start_acc=with_rs, steps=steps, more_steps=longer,
        more_steps_acc=more, zero_gradient_fraction=zero, gradient_free_acc=gradient_free, attack=attack.describe())


def masking_checks(model: nn.Module, data, attack: Attack, **settings: Any) -> list[str]:
    """Warnings (plain sentences, empty when all is well) about signs of gradient masking under ``attack``.

    ``settings`` are the keyword arguments of :func:`measure` (``batch_size``, ``device``,
    ``precision``, ``max_examples``, ``seed``, ``more_steps``). Runs, on ``max_examples`` examples of
    ``data`` (a DataLoader, a Dataset or an ``(images, labels)`` pair of [0, 1] images), that attack
    at eps/2, eps and 2*eps and at an eps covering the whole image box, once more with the other
    random-start setting, once with 5x the steps (unless ``more_steps`` is False) and one
    input-gradient pass: about 10x the cost of evaluating that subset once. The warnings are
    symptoms, not proof; each names what to try.
    """
    return judge(measure(model, data, attack, **settings), attack.threat)
