"""AutoAttack through the Attack value: stronger than PGD per example, in the ball and the box, equal to
torchattacks' own AutoAttack, and not fooled by a model that hides its gradient."""

from __future__ import annotations

import json

import pytest
import torch
import torchattacks
from torch import nn

from robust_transfer import Attack, ThreatModel, evaluate, load_dataset, transfer, with_normalization
from robust_transfer.autoattack import perturb
from robust_transfer.cli import main
from robust_transfer.study.plan import plan_runs
from robust_transfer.study.spec import load_spec
from tests.test_reliability import Quantised
from tests.test_study import TINY_SPEC, write_spec
from tests.user_models import TinyCNN

THREATS = [ThreatModel("linf", 8 / 255), ThreatModel("l2", 0.5)]


@pytest.fixture(scope="module")
def digits_model():
    """A small MLP trained on scikit-learn's digits (10 classes, 8x8), and 200 test images."""
    data = load_dataset("digits")
    x, y = data.train.images.float() / 255, data.train.labels
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval(), data.test.images[:200].float() / 255, data.test.labels[:200]


def _robust(model, x_adv, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


@pytest.mark.parametrize("threat", THREATS, ids=str)
def test_autoattack_is_at_most_pgd_per_example_and_stays_in_the_ball(digits_model, threat):
    model, x, y = digits_model
    clean = _robust(model, x, y)
    pgd = _robust(model, perturb(Attack(threat, steps=20), model, x, y), y)
    x_aa = perturb(Attack(threat, steps=100, kind="autoattack"), model, x, y)
    autoattack = _robust(model, x_aa, y)
    assert not (autoattack & ~pgd).any() and not (pgd & ~clean).any()  # per example
    assert autoattack.sum() < clean.sum()  # it breaks something
    delta = (x_aa - x).flatten(1)
    norms = delta.abs().amax(1) if threat.norm == "linf" else delta.norm(dim=1)
    assert (norms <= threat.eps + 1e-6).all() and x_aa.min() >= 0 and x_aa.max() <= 1


@pytest.mark.parametrize("threat", THREATS, ids=str)
def test_autoattack_agrees_with_torchattacks_own(digits_model, threat):
    model, x, y = digits_model
    ours = evaluate(model, (x, y), attack=Attack(threat, steps=100, kind="autoattack")).robust_acc
    reference = torchattacks.AutoAttack(model, norm="Linf" if threat.norm == "linf" else "L2", eps=threat.eps,
                                        n_classes=10, seed=0)
    theirs = _robust(model, reference(x, y), y).float().mean().item()
    assert abs(ours - theirs) <= 0.01


def test_autoattack_breaks_a_model_that_fools_pgd(linear_model, separable_data):
    masked = Quantised(linear_model)  # zero input gradient: PGD is blind
    threat = ThreatModel("linf", 0.15)  # (at 0.08 the rounding to 1/8 steps really does absorb most changes)
    assert evaluate(masked, separable_data, threat).robust_acc == 1.0
    result = evaluate(masked, separable_data, attack=Attack(threat, steps=100, kind="autoattack"))
    assert result.robust_acc < 0.05  # Square needs no gradient
    assert result.attack.startswith("AutoAttack (100 steps), linf eps 0.15")


def test_the_evaluate_command_takes_an_attack(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--dataset", "digits", "--method", "standard", "--eps", "0", "--epochs", "1",
                 "--batch-size", "64", "--train-examples", "256", "--eval-examples", "32", "--test-examples", "32",
                 "--no-progress", "--out-dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run / "model.safetensors"), "--dataset", "digits", "--attack", "apgd", "--norm",
                 "linf", "--eps", "8/255", "--max-examples", "50", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["attack"] == "APGD-CE + APGD-T (100 steps), linf eps 0.0313725" and record["steps"] == 100
    assert record["robust_acc"] <= record["clean_acc"]


def test_a_study_measures_robustness_with_the_attack_its_spec_names(tmp_path):
    text = TINY_SPEC.replace('[threat]\nnorm = "l2"\neps = 1.0\nsteps = 2\n',
                             '[threat]\nattack = "apgd"\nnorm = "l2"\neps = 1.0\n')
    spec = load_spec(write_spec(tmp_path, text=text))
    assert spec.threat.attack == Attack(ThreatModel("l2", 1.0), steps=100, kind="apgd")
    evaluations = [run for run in plan_runs(spec) if run.kind == "evaluate"]
    assert evaluations and all(run.config["attack"]["kind"] == "apgd" for run in evaluations)
    transfers = [run for run in plan_runs(spec) if run.kind == "transfer"]
    assert all(run.config["transfer"]["eval_attack"]["kind"] == "apgd" for run in transfers)


def test_the_masking_checks_flag_a_model_that_survives_pgd_but_not_square(linear_model, separable_data):
    masked = Quantised(linear_model)
    result = evaluate(masked, separable_data, ThreatModel("linf", 0.15), masking_check=True)
    assert result.robust_acc == 1.0
    text = "\n".join(result.warnings)
    assert "Square, an attack that uses no gradient, leaves" in text and "--attack autoattack" in text
    healthy = evaluate(linear_model, separable_data, ThreatModel("linf", 0.08), masking_check=True)
    assert not any("Square" in warning for warning in healthy.warnings)


def test_robust_accuracy_after_transfer_under_autoattack(tmp_path, digits_model):
    model, x, y = digits_model
    threat = ThreatModel("linf", 8 / 255)
    by_name = evaluate(model, (x[:50], y[:50]), threat, attack="apgd")  # the spelling
    assert by_name.attack == "APGD-CE + APGD-T (100 steps), linf eps 0.0313725"
    source = with_normalization(TinyCNN(), 0.5, 0.25, builder="tests.user_models:tiny_cnn")
    result = transfer(model=source, dataset="digits", mode="fixed", eval_attack=Attack(threat, steps=5, kind="apgd"),
                      eval_examples=32, out_dir=str(tmp_path / "t"), cache_dir=str(tmp_path / "cache"), progress=False)
    robust = result.record.robust
    assert robust.attack.startswith("APGD-CE + APGD-T (5 steps)") and robust.robust_acc <= robust.clean_acc
