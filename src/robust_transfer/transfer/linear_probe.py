"""Multinomial logistic regression on fixed features: full-batch L-BFGS over a path of L2 penalties.

The penalty is chosen on a held-out validation split, then the head is refit on train +
validation (as in Kornblith et al., "Do Better ImageNet Models Transfer Better?").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .metrics import score

DEFAULT_PENALTIES = tuple(10.0 ** e for e in torch.linspace(-6, 0, 10).tolist())


@dataclass
class LinearHead:
    """A fitted head in the original feature space: logits = features @ weight.T + bias."""

    weight: torch.Tensor
    bias: torch.Tensor
    penalty: float
    val_scores: dict[float, float]


def _standardise(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = train.mean(0)
    std = train.std(0).clamp_min(1e-6)
    return mean, std


def penalised_cross_entropy(weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor,
                            features_t: torch.Tensor, onehot_t: torch.Tensor, penalty: float
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy + 0.5 * penalty * ||weight||^2 and its gradients, computed in closed form.

    ``features_t`` [D, N] and ``onehot_t`` [C, N] are the transposed features and one-hot labels:
    logits are laid out [C, N] so the softmax runs along the long axis, which is about 10x faster
    on the CPU than a softmax over 10 classes per row, and autograd is not needed at all. Together
    this makes an evaluation about 2.5x cheaper than autograd through ``F.cross_entropy``.
    """
    count = features.shape[0]
    logits = torch.addmm(bias[:, None], weight, features_t)
    logits -= logits.amax(0)
    probabilities = logits.exp()
    totals = probabilities.sum(0)
    loss = (totals.log().sum() - (logits * onehot_t).sum()) / count + 0.5 * penalty * weight.pow(2).sum()
    probabilities /= totals
    probabilities -= onehot_t  # d loss / d logits, times count
    probabilities /= count
    return loss, torch.addmm(weight, probabilities, features, beta=penalty), probabilities.sum(1)


@dataclass
class _Problem:
    """One fitting problem in the layout `penalised_cross_entropy` wants, built once for every penalty."""

    features: torch.Tensor
    features_t: torch.Tensor
    onehot_t: torch.Tensor

    @classmethod
    def of(cls, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> _Problem:
        onehot_t = F.one_hot(labels, num_classes).to(features.dtype).T.contiguous()
        return cls(features, features.T.contiguous(), onehot_t)


def _fit(problem: _Problem, penalty: float, init: tuple[torch.Tensor, torch.Tensor] | None,
         max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    classes, dims = problem.onehot_t.shape[0], problem.features.shape[1]
    dtype = problem.features.dtype
    weight = init[0].clone() if init else torch.zeros(classes, dims, dtype=dtype)
    bias = init[1].clone() if init else torch.zeros(classes, dtype=dtype)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        # L-BFGS reads .grad: set it from the closed form instead of running backward.
        loss, weight.grad, bias.grad = penalised_cross_entropy(weight, bias, problem.features, problem.features_t,
                                                               problem.onehot_t, penalty)
        return loss

    optimizer.step(closure)
    return weight, bias


def fit_linear_head(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                    val_labels: torch.Tensor, num_classes: int, penalties: Sequence[float] = DEFAULT_PENALTIES,
                    metric: str = "top1", refit: bool = True, max_iter: int = 50) -> LinearHead:
    """Fit the head for each penalty (strongest first, warm-started), keep the best on validation.

    Features are standardised with training statistics for a well-conditioned problem; the
    returned weights are mapped back so they apply to raw features. With ``refit`` the chosen
    penalty is refit on train + validation. ``max_iter`` L-BFGS iterations per penalty suffice
    because each fit starts from the previous penalty's solution (50: within 0.1 point of 300 on
    Animal-MNIST at a quarter of the time; benchmarks/transfer_fixed_feature.py).
    """
    with torch.no_grad():
        mean, std = _standardise(train_features)
        train_x = (train_features - mean) / std
        val_x = (val_features - mean) / std
    scores: dict[float, float] = {}
    best: tuple[float, float, tuple[torch.Tensor, torch.Tensor]] | None = None
    init = None
    train_problem = _Problem.of(train_x, train_labels, num_classes)
    for penalty in sorted(penalties, reverse=True):
        init = _fit(train_problem, penalty, init, max_iter)
        with torch.no_grad():
            predictions = (val_x @ init[0].T + init[1]).argmax(1)
        scores[penalty] = score(predictions, val_labels, num_classes, metric)
        # Ties go to the stronger penalty (seen first): the simpler head.
        if best is None or scores[penalty] > best[1] + 1e-12:
            best = (penalty, scores[penalty], init)
    assert best is not None
    penalty, _, (weight, bias) = best
    if refit:
        all_x = torch.cat([train_x, val_x])
        all_y = torch.cat([train_labels, val_labels])
        weight, bias = _fit(_Problem.of(all_x, all_y, num_classes), penalty, (weight, bias), max_iter)
    # Fold the standardisation into the head: W((f - m) / s) + b = (W / s) f + (b - W m / s).
    raw_weight = weight / std
    raw_bias = bias - (weight * (mean / std)).sum(1)
    if not (torch.isfinite(raw_weight).all() and math.isfinite(float(raw_bias.sum()))):
        raise FloatingPointError("the linear head diverged")
    return LinearHead(raw_weight, raw_bias, penalty, scores)
