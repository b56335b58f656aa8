"""Adversarial examples for any `Attack` kind: our PGD, or AutoAttack's attacks from torchattacks.

AutoAttack (Croce and Hein 2020) is what RobustBench and most papers since report: APGD-CE, APGD-T
(9 target classes), FAB-T and Square (5,000 queries), each run only on the points the attacks before it
left correct, the worst case kept per example. ``apgd`` is the fast subset for studies (APGD-CE then
APGD-T). The targeted attacks need at least 4 classes (their loss reads the 4 largest logits); with
fewer they are left out. The attacks are torchattacks' (well kept, and written for [0, 1] inputs as our models take);
here they run in fp32 with autocast off, even when the model trains in bf16, and in eval mode.
"""

from __future__ import annotations

import torch
import torchattacks
from torch import nn
from tqdm.auto import tqdm

from .attack import Attack, eval_mode
from .folding import folded_batchnorm

SQUARE_QUERIES = 5000
MIN_TARGETED_CLASSES = 4


def _suite(attack: Attack, model: nn.Module, num_classes: int, seed: int,
           square_queries: int) -> list[tuple[str, torchattacks.Attack]]:
    norm = "Linf" if attack.threat.norm == "linf" else "L2"
    common = {"norm": norm, "eps": attack.threat.eps, "seed": seed}
    restarts = attack.restarts + 1
    parts = {
        "apgd-ce": lambda: torchattacks.APGD(model, steps=attack.steps, n_restarts=restarts, loss="ce", **common),
        "apgd-t": lambda: torchattacks.APGDT(model, steps=attack.steps, n_restarts=restarts, n_classes=num_classes,
                                             **common),
        "fab-t": lambda: torchattacks.FAB(model, steps=attack.steps, n_restarts=restarts, multi_targeted=True,
                                          n_classes=num_classes, **common),
        "square": lambda: torchattacks.Square(model, n_queries=square_queries, n_restarts=restarts, **common),
    }
    names = {"autoattack": ["apgd-ce", "apgd-t", "fab-t", "square"], "apgd": ["apgd-ce", "apgd-t"],
             "apgd-ce": ["apgd-ce"], "apgd-t": ["apgd-t"], "square": ["square"]}[attack.kind]
    if num_classes < MIN_TARGETED_CLASSES:  # their targeted DLR loss reads the 3rd and 4th largest logits
        names = [name for name in names if name not in ("apgd-t", "fab-t")] or ["apgd-ce"]
    return [(name, parts[name]()) for name in names]


def perturb(attack: Attack, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
            generator: torch.Generator | None = None, seed: int = 0, progress: bool = False,
            square_queries: int = SQUARE_QUERIES) -> torch.Tensor:
    """Adversarial examples for ``x`` under ``attack`` (any kind), inside its ball and the [0, 1] box.

    For the AutoAttack kinds each sub-attack runs on the examples still classified correctly; an example
    keeps the first perturbation that fools the model (the clean image if none does). ``square_queries``
    is Square's budget (AutoAttack's is 5,000).
    """
    if attack.kind == "pgd":
        return attack(model, x, y, generator=generator)
    x = x.detach().float().contiguous()
    with eval_mode(model), folded_batchnorm(model), torch.autocast(x.device.type, enabled=False):
        with torch.no_grad():
            logits = model(x)
        robust = logits.argmax(1) == y
        x_adv = x.clone()
        parts = _suite(attack, model, logits.shape[1], seed, square_queries)
        bar = tqdm(parts, desc=attack.kind, unit="attack", leave=False, disable=not progress)
        for name, sub_attack in bar:
            bar.set_postfix(running=name, still_robust=int(robust.sum()))
            index = robust.nonzero().flatten()
            if len(index) == 0:
                break
            candidate = sub_attack(x[index], y[index]).detach()
            candidate = attack.threat.project(candidate, x[index])  # guard the ball and box against rounding
            with torch.no_grad():
                fooled = model(candidate).argmax(1) != y[index]
            x_adv[index[fooled]] = candidate[fooled]
            robust[index[fooled]] = False
    return x_adv
