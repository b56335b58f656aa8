"""Time to a target robust accuracy: our fastest recipe against PGD-7 adversarial training in a plain fp32 loop.

small_resnet on Fashion-MNIST, L2 eps 1. After every epoch each contender's model is attacked with the same
PGD-20 (fp32, L2 eps 1) on the same 1,000 test images; the clock counts training only, and stops at the first
epoch whose robust accuracy reaches the target (60% by default).

- ``ours``: the library's engine (`TrainingState`, `run_epoch`) with FGSM-RS (one step of 1.25 eps from a
  random start), channels_last, bf16 autocast where the hardware is fast at it, `tune_malloc`.
- ``ours-compiled`` (optional): ``ours`` with the training forward and the attack run through one
  `torch.compile`d module, as ``pretrain --compile`` does; the compilation counts as training time.
- ``plain``: a plain fp32 NCHW PyTorch loop: PGD-7 (step 2.5 eps / 7, random start in the ball) in eval mode,
  then a training step, as the robustness library runs (docs/BENCHMARKS.md: it runs at that loop's speed).
- ``plain-short`` (optional): ``plain`` on ours' schedule, to tell the schedule's share of the gap from the
  method's and the hardware's.

Each contender brings its recipe, as in a time-to-accuracy race: ``plain`` the usual one (SGD lr ``--lr``
0.05, cosine over ``--epochs`` 6, batch ``--batch-size`` 128), ours its fastest (lr ``--ours-lr`` 0.2, cosine
annealed to zero over ``--ours-epochs`` 1, batch ``--ours-batch-size`` 32). All use momentum 0.9, weight decay
5e-4 and half an epoch of linear warm-up, start from the same initial weights and see the same examples in
the same order (seeded). Run from the repository root:

    PYTHONPATH=src .venv/bin/python benchmarks/time_to_robust_accuracy.py --json benchmarks/results/FILE.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer import Attack, ThreatModel, create_model, evaluate, load_dataset
from robust_transfer.data import make_batches, sample_examples
from robust_transfer.runtime import prepare_model, resolve_device, resolve_precision, tune_malloc
from robust_transfer.train.engine import TrainingState, run_epoch
from robust_transfer.train.objectives import make_objective
from robust_transfer.train.schedule import lr_multiplier

EPS = 1.0


@dataclass(frozen=True)
class Recipe:
    """What a contender brings to the race besides its method."""

    lr: float
    epochs: int  # the cosine schedule's length, and the most the contender trains
    batch_size: int
    warmup_epochs: float


def _recipe(name: str, args) -> Recipe:
    if name == "plain":
        return Recipe(args.lr, args.epochs, args.batch_size, args.warmup)
    return Recipe(args.ours_lr, args.ours_epochs, args.ours_batch_size, args.ours_warmup)


def _optimiser(model: nn.Module, recipe: Recipe, steps_per_epoch: int):
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(
        "cosine", recipe.epochs * steps_per_epoch, round(recipe.warmup_epochs * steps_per_epoch), []))
    return optimizer, scheduler


def plain_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """L2 PGD as a plain loop writes it: random start in the ball, normalised gradient steps, projection."""
    step = 2.5 * EPS / steps
    delta = torch.randn_like(x)
    delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * EPS * torch.rand(len(x), 1, 1, 1)
    x_adv = (x + delta).clamp(0, 1)
    model.eval()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        grad = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        x_adv = x_adv.detach() + step * grad
        x_adv = (x + (x_adv - x).flatten(1).renorm(2, 0, EPS).view_as(x)).clamp(0, 1)
    model.train()
    return x_adv.detach()


def train_plain(model: nn.Module, train_set, batch_size: int, args, epoch: int, optimizer, scheduler) -> None:
    model.train()
    for x, y in make_batches(train_set, batch_size, shuffle=True, seed=args.seed, epoch=epoch,
                             augment="crop-flip", drop_last=True):
        x_adv = plain_pgd(model, x, y)
        loss = F.cross_entropy(model(x_adv), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()


def race(name: str, initial: nn.Module, train_set, test_set, args) -> dict:
    torch.manual_seed(args.seed)
    model = copy.deepcopy(initial)
    test_attack = Attack(ThreatModel("l2", EPS), steps=20)
    ours = name.startswith("ours")
    recipe = _recipe(name, args)
    steps_per_epoch = len(make_batches(train_set, recipe.batch_size, shuffle=True, drop_last=True))
    if ours:
        device = resolve_device("auto")
        precision = resolve_precision("auto", device)
        model = prepare_model(model, device)
        optimizer, scheduler = _optimiser(model, recipe, steps_per_epoch)
        state = TrainingState(model, optimizer, scheduler,
                              make_objective("fgsm-rs", Attack(ThreatModel("l2", EPS))))
        # ours-compiled: the steps run through one compiled module; its compilation counts as training time.
        step_model = torch.compile(model) if name == "ours-compiled" else model
    else:
        device, precision = torch.device("cpu"), "fp32"
        optimizer, scheduler = _optimiser(model, recipe, steps_per_epoch)
    epochs, trained = [], 0.0
    for epoch in range(recipe.epochs):
        started = time.perf_counter()
        if ours:
            run_epoch(state, make_batches(train_set, recipe.batch_size, shuffle=True, seed=args.seed, epoch=epoch,
                                          augment="crop-flip", drop_last=True), device=device, precision=precision,
                      train_model=step_model, attack_model=step_model)
        else:
            train_plain(model, train_set, recipe.batch_size, args, epoch, optimizer, scheduler)
        trained += time.perf_counter() - started
        result = evaluate(model, test_set, attack=test_attack, precision="fp32", seed=args.seed)
        epochs.append({"epoch": epoch + 1, "train_s": trained, "clean_acc": result.clean_acc,
                       "robust_acc": result.robust_acc})
        print(f"{name}: epoch {epoch + 1}, {trained:.0f} s of training, clean {result.clean_acc:.3f}, "
              f"robust {result.robust_acc:.3f}", flush=True)
        if result.robust_acc >= args.target:
            break
    reached = next((e for e in epochs if e["robust_acc"] >= args.target), None)
    return {"name": name, "precision": precision, "recipe": asdict(recipe), "epochs": epochs,
            "seconds_to_target": reached["train_s"] if reached else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=0.60, help="robust accuracy to reach")
    parser.add_argument("--epochs", type=int, default=6, help="plain's schedule length in epochs (and its most)")
    parser.add_argument("--train-examples", type=int, default=16000)
    parser.add_argument("--test-examples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128, help="plain's batch size")
    parser.add_argument("--lr", type=float, default=0.05, help="plain's learning rate")
    parser.add_argument("--warmup", type=float, default=0.5, help="plain's linear warm-up, in epochs")
    parser.add_argument("--ours-lr", type=float, default=0.2, help="ours' (and plain-short's) learning rate")
    parser.add_argument("--ours-batch-size", type=int, default=32,
                        help="ours' (and plain-short's) batch size")
    parser.add_argument("--ours-epochs", type=int, default=1,
                        help="ours' (and plain-short's) schedule length in epochs (and its most)")
    parser.add_argument("--ours-warmup", type=float, default=0.5,
                        help="ours' (and plain-short's) linear warm-up, in epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contenders", default="ours,plain",
                        help="ours, ours-compiled (the same through torch.compile, compilation timed), plain "
                             "and plain-short (plain on ours' schedule)")
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args()
    tune_malloc()
    data = load_dataset("fashion-mnist", seed=args.seed)
    train_set = sample_examples(data.train, args.train_examples, args.seed)
    test_set = sample_examples(data.test, args.test_examples, args.seed)
    torch.manual_seed(args.seed)
    initial = create_model("small_resnet", num_classes=data.num_classes, in_channels=data.in_channels,
                           mean=data.mean, std=data.std)
    results = [race(name, initial, train_set, test_set, args) for name in args.contenders.split(",")]
    times = {r["name"]: r["seconds_to_target"] for r in results}
    # Against plain (each on its own recipe), and against plain-short (the same schedule as ours).
    speedups = {f"{name} vs {baseline}": times[baseline] / seconds
                for baseline in ("plain", "plain-short") if times.get(baseline)
                for name, seconds in times.items() if name != baseline and name != "plain" and seconds}
    summary = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "settings": vars(args), "results": results, "speedups": speedups}
    for r in results:
        reached = f"{r['seconds_to_target']:.0f} s" if r["seconds_to_target"] else "not reached"
        recipe = r["recipe"]
        print(f"{r['name']:>13} ({r['precision']}, lr {recipe['lr']:g}, cosine over {recipe['epochs']} epochs, "
              f"batch {recipe['batch_size']}, warm-up {recipe['warmup_epochs']:g} epochs): "
              f"{reached} to robust accuracy {args.target:.0%}")
    for pair, speedup in speedups.items():
        print(f"{pair}: {speedup:.1f}x faster to the target (goal for ours vs plain: >= 8x)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)


if __name__ == "__main__":
    main()
