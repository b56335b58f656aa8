"""Threat models, PGD and evaluate: attacks stay inside the ball and the box, and really attack."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from robust_transfer import RobustTransferError, ThreatModel, evaluate, fgsm, pgd
from robust_transfer.parsing import parse_eps
from tests.conftest import TinyConvNet

NET = TinyConvNet(in_channels=3, num_classes=4)


def _tolerance(eps: float) -> float:
    return 1e-6 * (1 + eps)


@settings(max_examples=60, deadline=None)
@given(
    norm=st.sampled_from(["l2", "linf"]),
    eps=st.one_of(st.just(0.0), st.floats(1e-4, 3.0)),
    steps=st.integers(0, 4),
    batch=st.integers(1, 4),
    side=st.integers(3, 7),
    precision=st.sampled_from(["fp32", "autocast-bf16", "bf16-tensors"]),
    channels_last=st.booleans(),
    random_start=st.booleans(),
    restarts=st.integers(0, 1),
    targeted=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_pgd_stays_in_ball_and_box(norm, eps, steps, batch, side, precision, channels_last, random_start,
                                   restarts, targeted, seed):
    generator = torch.Generator().manual_seed(seed)
    # Inputs at and near the box edges are where a careless projection leaks out.
    x = torch.rand(batch, 3, side, side, generator=generator).mul(1.4).sub(0.2).clamp(0, 1)
    y = torch.randint(0, 4, (batch,), generator=generator)
    model = NET.float()
    if precision == "bf16-tensors":
        model, x = NET.bfloat16(), x.bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    threat = ThreatModel(norm, eps)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "autocast-bf16" else torch.no_grad()
    if precision == "autocast-bf16":
        with context:
            x_adv = pgd(model, x, y, threat, steps, random_start=random_start, restarts=restarts, targeted=targeted)
    else:
        x_adv = pgd(model, x, y, threat, steps, random_start=random_start, restarts=restarts, targeted=targeted)
    NET.float()
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    norms = threat.norm_of(x_adv.float() - x.float())
    assert float(norms.max()) <= eps + _tolerance(eps)


def test_attack_restores_modes_and_leaves_no_parameter_gradients(tiny_net):
    tiny_net.train()
    tiny_net.features[1].eval()  # a submodule deliberately in eval mode keeps it
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 5, (4,))
    running_mean = tiny_net.features[1].running_mean.clone()
    tiny_net.train()
    tiny_net.features[1].eval()
    pgd(tiny_net, x, y, ThreatModel("linf", 8 / 255), steps=3)
    assert tiny_net.training and tiny_net.fc.training
    assert not tiny_net.features[1].training
    assert all(p.grad is None for p in tiny_net.parameters())
    # Eval mode during the attack: BatchNorm statistics were not updated by the attack's passes.
    tiny_net.features[1].train()
    pgd(tiny_net, x, y, ThreatModel("l2", 0.5), steps=3)
    assert torch.equal(tiny_net.features[1].running_mean, running_mean)


def test_attack_passes_run_with_frozen_parameters_and_only_the_trainable_ones_thaw(tiny_net):
    # A compiled model traces what its backward computes: trainable weights there would cost every attack
    # step a weight gradient. A layer frozen before the attack (fixed-feature transfer) stays frozen.
    tiny_net.features[0].weight.requires_grad_(False)
    before = [p.requires_grad for p in tiny_net.parameters()]
    seen = []
    tiny_net.fc.register_forward_pre_hook(lambda *_: seen.append(any(p.requires_grad for p in tiny_net.parameters())))
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 5, (4,))
    x_adv = pgd(tiny_net, x, y, ThreatModel("l2", 0.5), steps=2)
    assert len(seen) >= 2 and not any(seen)
    assert [p.requires_grad for p in tiny_net.parameters()] == before
    assert float((x_adv - x).abs().max()) > 0  # the input gradient still flowed


def test_pgd_breaks_a_trained_model_and_robust_never_exceeds_clean(linear_model, separable_data):
    x, y = separable_data
    clean = evaluate(linear_model, (x, y))
    weak = evaluate(linear_model, (x, y), ThreatModel("l2", 0.05), steps=10)
    strong = evaluate(linear_model, (x, y), ThreatModel("l2", 2.0), steps=10)
    assert clean.clean_acc > 0.95 and clean.robust_acc is None
    assert strong.robust_acc < 0.05 < weak.robust_acc <= weak.clean_acc
    assert weak.n == len(y) and weak.threat == "l2(eps=0.05)"


def test_more_restarts_and_more_steps_never_raise_robust_accuracy(linear_model, separable_data):
    x, y = separable_data
    threat = ThreatModel("linf", 0.08)
    by_restarts = [evaluate(linear_model, (x, y), threat, steps=2, restarts=r, seed=1).robust_acc
                   for r in (0, 1, 3)]
    # A fixed step size makes a longer attack pass through every iterate of a shorter one.
    by_steps = [evaluate(linear_model, (x, y), threat, steps=s, step_size=0.02, seed=1).robust_acc
                for s in (1, 3, 6)]
    assert by_restarts == sorted(by_restarts, reverse=True)
    assert by_steps == sorted(by_steps, reverse=True)
    assert by_steps[0] > by_steps[-1]


def test_targeted_attack_reaches_the_target(linear_model, separable_data):
    x, y = separable_data
    target = 1 - y
    x_adv = pgd(linear_model, x, target, ThreatModel("l2", 3.0), steps=20, targeted=True)
    assert (linear_model(x_adv).argmax(1) == target).float().mean() > 0.95


def test_custom_loss_is_the_one_ascended(linear_model, separable_data):
    x, y = separable_data
    # A loss that ignores the input has zero gradient: the L2 step then goes nowhere.
    flat = lambda logits, labels: (logits * 0).sum(1)
    x_adv = pgd(linear_model, x, y, ThreatModel("l2", 1.0), steps=5, random_start=False, loss_fn=flat)
    assert torch.equal(x_adv, x)


def test_fgsm_linf_is_one_signed_step():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x = torch.full((2, 3, 2, 2), 0.5)
    y = torch.tensor([0, 2])
    x_adv = fgsm(model, x, y, ThreatModel("linf", 0.1))
    # Every pixel moves by exactly eps (none is at the box edge, and a linear model's gradient has no zeros)...
    assert torch.allclose((x_adv - x).abs(), torch.full_like(x, 0.1), atol=1e-6)
    # ...in the direction that raises the loss.
    loss = lambda images: torch.nn.functional.cross_entropy(model(images), y)
    assert loss(x_adv) > loss(x)


def test_steps_have_the_asked_length_in_their_norm():
    x, grad = torch.rand(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    l2 = ThreatModel("l2", 1.0).step(x, grad, 0.3) - x
    linf = ThreatModel("linf", 1.0).step(x, grad, 0.3) - x
    assert torch.allclose(l2.flatten(1).norm(dim=1), torch.full((3,), 0.3), atol=1e-5)
    assert torch.allclose(linf.abs(), torch.full_like(linf, 0.3), atol=1e-6)


def test_l2_random_start_fills_the_ball():
    x = torch.full((500, 1, 4, 4), 0.5)
    start = ThreatModel("l2", 0.2).random_start(x, torch.Generator().manual_seed(0))
    norms = (start - x).flatten(1).norm(dim=1)
    assert float(norms.max()) <= 0.2 + 1e-6
    assert 0.1 < float(norms.min()) and float(norms.mean()) < 0.2  # uniform in 16-d: mass near the surface


def test_evaluate_accepts_loaders_datasets_and_pairs(linear_model, separable_data):
    x, y = separable_data
    threat = ThreatModel("l2", 0.3)
    results = [evaluate(linear_model, data, threat, steps=5, batch_size=64, seed=3)
               for data in ((x, y), TensorDataset(x, y), DataLoader(TensorDataset(x, y), batch_size=64))]
    assert len({(r.clean_acc, r.robust_acc, r.n) for r in results}) == 1
    assert evaluate(linear_model, (x, y), max_examples=10).n == 10
    with pytest.raises(RobustTransferError, match="DataLoader"):
        evaluate(linear_model, [1, 2, 3])


@pytest.mark.parametrize("text,value", [("8/255", 8 / 255), ("0.5", 0.5), (" 1 / 4 ", 0.25), (3, 3.0), ("0", 0.0)])
def test_eps_parsing(text, value):
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["-0.1", "abc", "1/0", "nan", "inf", "__import__('os').getcwd()", "2**3"])
def test_bad_eps_is_a_clear_error(text):
    with pytest.raises(RobustTransferError, match="eps"):
        parse_eps(text)


def test_unknown_norm_names_the_valid_ones():
    with pytest.raises(RobustTransferError, match="l2, linf"):
        ThreatModel("l3", 0.5)
    assert ThreatModel("Linf", "8/255").eps == pytest.approx(8 / 255)


@pytest.mark.parametrize("norm,eps", [("linf", 0.073), ("l2", 0.6)])
def test_agrees_with_torchattacks(linear_model, separable_data, norm, eps):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = separable_data
    steps, step_size = 10, 2.5 * eps / 10
    if norm == "linf":
        attack = torchattacks.PGD(linear_model, eps=eps, alpha=step_size, steps=steps, random_start=False)
    else:
        attack = torchattacks.PGDL2(linear_model, eps=eps, alpha=step_size, steps=steps, random_start=False)
    theirs = (linear_model(attack(x, y)).argmax(1) == y).float().mean().item()
    ours = evaluate(linear_model, (x, y), ThreatModel(norm, eps), steps=steps, random_start=False).robust_acc
    assert 0.1 < theirs < 0.9, "pick an eps where the attack is neither hopeless nor total"
    assert abs(ours - theirs) <= 0.01
