"""The paper's perceptual-alignment pictures as attacks: each is the project's PGD with another loss.

- representation inversion: from a start image (noise or another image), L2 PGD with a large eps that
  *lowers* the squared distance between the model's penultimate features and a target image's (the
  robustness library's "inversion"); on robust models the result looks like the target.
- class synthesis: a large-eps targeted attack from a class-conditional seed (a Gaussian fitted to the
  class's images, the robustness library's "generation" recipe).
- saliency: the gradient of the class's logit with respect to the input, its absolute value's largest
  channel.

Every function takes an `Attack` (threat, steps, step size), so an eps means what it means everywhere:
a distance in [0, 1] pixel space.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attack import Attack, eval_mode
from ..errors import RobustTransferError
from ..transfer.features import feature_extractor


def _squared_distance(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (features.float().flatten(1) - target.float().flatten(1)).pow(2).sum(1)


@torch.no_grad()
def feature_distance(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per example, the squared L2 distance between ``model``'s penultimate features of ``x`` and of ``target``."""
    extractor = feature_extractor(model)
    with eval_mode(extractor):
        return _squared_distance(extractor(x), extractor(target))


def _pgd_only(attack: Attack, what: str) -> None:
    if attack.kind != "pgd" or attack.threat.eps <= 0:
        raise RobustTransferError(f"{what} needs a PGD attack with eps > 0, got {attack.describe()}")


def invert_representation(model: nn.Module, target: torch.Tensor, start: torch.Tensor, attack: Attack) -> torch.Tensor:
    """Images within ``attack``'s ball around ``start`` whose penultimate features approach ``target``'s.

    ``start`` and ``target`` are [0, 1] batches of the same shape; PGD descends the squared feature distance
    from ``start`` (no random start), returning its last iterate.
    """
    _pgd_only(attack, "representation inversion")
    if start.shape != target.shape:
        raise RobustTransferError(f"start {tuple(start.shape)} and target {tuple(target.shape)} must have one shape")
    extractor = feature_extractor(model)
    with torch.no_grad(), eval_mode(extractor):
        goal = extractor(target).detach()
    # PGD ascends its loss: the negative distance.
    return attack.replace(random_start=False, restarts=0)(
        extractor, start, goal, use_best=False, loss_fn=lambda features, wanted: -_squared_distance(features, wanted))


def class_seeds(images: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One seed per entry of ``classes``: a draw from a Gaussian with the class's per-pixel mean and covariance
    over a 4x-downsampled grid (the robustness library's recipe), upsampled and clipped to [0, 1]."""
    seeds = []
    for cls in classes.tolist():
        own = images[labels == cls].float()
        if len(own) < 2:
            raise RobustTransferError(f"class {cls} has {len(own)} image(s): a seed needs at least 2")
        small = nn.functional.interpolate(own, scale_factor=0.25, mode="bilinear", antialias=True) \
            if min(own.shape[-2:]) >= 8 else own
        flat = small.flatten(1).double()
        mean = flat.mean(0)
        covariance = torch.cov(flat.T) + 1e-4 * torch.eye(flat.shape[1], dtype=flat.dtype)
        draw = mean + torch.linalg.cholesky(covariance) @ torch.randn(flat.shape[1], generator=generator,
                                                                        dtype=flat.dtype)
        seed = draw.float().view(1, *small.shape[1:])
        seeds.append(nn.functional.interpolate(seed, size=own.shape[-2:], mode="bilinear").clamp(0, 1))
    return torch.cat(seeds)


def synthesize_class(model: nn.Module, seeds: torch.Tensor, classes: torch.Tensor, attack: Attack) -> torch.Tensor:
    """Targeted PGD from ``seeds`` towards ``classes``: what the model draws for each class within the ball."""
    _pgd_only(attack, "class synthesis")
    return attack.replace(random_start=False, restarts=0)(model, seeds, classes, use_best=False, targeted=True)


def saliency(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """|d logit_class / d x|, the largest over channels, scaled to [0, 1] per image: N x 1 x H x W."""
    x = x.detach().clone().requires_grad_(True)
    with eval_mode(model):
        logits = model(x)
    (grad,) = torch.autograd.grad(logits.gather(1, classes.view(-1, 1)).sum(), x)
    amount = grad.abs().amax(dim=1, keepdim=True)
    peak = amount.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (amount / peak).detach()
