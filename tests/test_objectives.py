"""The training objectives do what their names promise: a perturbation that is not zero, stays in the ball
and the box, and raises the loss; free training's moves between replays; adversarial training buys
robustness that standard training does not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer import Attack, ThreatModel, evaluate
from robust_transfer.train.objectives import FreeObjective, make_objective
from robust_transfer.train.step import train_step

ATTACKS = {"linf": Attack(ThreatModel("linf", 0.1), steps=5), "l2": Attack(ThreatModel("l2", 0.5), steps=5)}


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def _check_perturbation(x_adv: torch.Tensor, x: torch.Tensor, attack: Attack) -> None:
    delta = (x_adv - x).flatten(1)
    norms = delta.abs().amax(1) if attack.threat.norm == "linf" else delta.norm(dim=1)
    assert (norms > attack.threat.eps / 10).all(), "some examples were not perturbed"
    assert (norms <= attack.threat.eps + 1e-5).all(), "a perturbation left the ball"
    assert x_adv.min() >= 0 and x_adv.max() <= 1, "a perturbation left the [0, 1] box"


@pytest.mark.parametrize("norm", list(ATTACKS))
@pytest.mark.parametrize("method", ["pgd", "fgsm-rs"])
def test_the_training_attack_is_in_the_ball_and_raises_the_loss(linear_model, separable_data, method, norm):
    x, y = separable_data
    attack = ATTACKS[norm]
    torch.manual_seed(0)
    x_adv = make_objective(method, attack).perturb(linear_model, x, y)
    _check_perturbation(x_adv, x, attack)
    assert _loss(linear_model, x_adv, y) > _loss(linear_model, x, y) + 0.05


@pytest.mark.parametrize("norm", list(ATTACKS))
def test_free_training_moves_its_perturbation_every_replay_and_raises_the_loss(linear_model, separable_data, norm):
    x, y = separable_data
    attack = ATTACKS[norm].replace(step_size=ATTACKS[norm].threat.eps / 2)
    objective = make_objective("free", attack, free_replays=3)
    assert isinstance(objective, FreeObjective)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    model.load_state_dict(linear_model.state_dict())
    seen = []
    for _replay in range(3):
        loss, _ = objective.loss(model, model, x, y)
        seen.append(objective._x_adv.detach().clone())
        loss.backward()
        objective.after_backward()
    assert torch.equal(seen[0], x)  # the first replay starts from the clean batch
    for before, after in zip(seen, seen[1:], strict=False):
        assert not torch.equal(before, after), "the perturbation did not move between replays"
    _check_perturbation(seen[-1], x, attack)
    assert _loss(model, seen[-1], y) > _loss(model, x, y) + 0.05


def _train(method: str, attack: Attack, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    objective = make_objective(method, attack)
    for step in range(150):
        rows = torch.arange(step * 32, step * 32 + 32) % len(x)
        train_step(model, optimizer, objective, x[rows], y[rows], precision="fp32", device=torch.device("cpu"))
    return model.eval()


@pytest.mark.parametrize("method", ["pgd", "fgsm-rs", "free"])
def test_adversarial_training_beats_standard_training_under_attack(separable_data, method):
    x, y = separable_data
    train, test = slice(0, 192), slice(192, 256)
    attack = Attack(ThreatModel("linf", 0.08), steps=10)
    standard = _train("standard", attack, x[train], y[train])
    robust = _train(method, attack, x[train], y[train])
    standard_result = evaluate(standard, (x[test], y[test]), attack=attack)
    robust_result = evaluate(robust, (x[test], y[test]), attack=attack)
    assert standard_result.clean_acc > 0.9 and robust_result.clean_acc > 0.9  # both learned the task
    assert robust_result.robust_acc > standard_result.robust_acc + 0.2
