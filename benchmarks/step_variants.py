"""One adversarial training step (or its attack alone) in each memory layout, with and without BatchNorm folding.

For one architecture and batch, the variants are the product of

- layout: ``nchw`` (PyTorch's default) or ``cl`` (channels_last, the layout oneDNN and cuDNN compute in);
- BatchNorm: ``fold`` (the attack's eval-mode passes run each conv + BatchNorm as one convolution,
  `robust_transfer.folding`, what the library does) or ``bn`` (the folding switched off for comparison).

Every variant starts from the same weights and trains on the same batch through the library's `train_step`
(``--what step``: the attack plus the training forward, backward and SGD update) or runs the training
attack alone (``--what attack``). One untimed step each, then rounds in which every variant runs once, the
order rotating; the report gives each variant's median and the median of same-round ratios, which is what
to read on a shared machine.

    PYTHONPATH=src .venv/bin/python benchmarks/step_variants.py --arch small_resnet --method fgsm-rs
    PYTHONPATH=src .venv/bin/python benchmarks/step_variants.py --arch cifar_resnet18 --method pgd --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
from unittest import mock

import torch

import robust_transfer.attack as attack_module
from robust_transfer import Attack, ThreatModel, create_model
from robust_transfer.runtime import autocast, resolve_device, tune_malloc
from robust_transfer.train.objectives import make_objective
from robust_transfer.train.step import train_step

VARIANTS = ("nchw-bn", "nchw-fold", "cl-bn", "cl-fold")
RATIOS = (("nchw-bn", "nchw-fold"), ("cl-bn", "cl-fold"), ("nchw-bn", "cl-bn"), ("nchw-bn", "cl-fold"))


def _variant(name: str, base, x, y, args, device):
    model = copy.deepcopy(base).to(device)
    x = x.to(device)
    if name.startswith("cl"):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    objective = make_objective(args.method, Attack(ThreatModel("l2", args.eps), steps=args.attack_steps))
    y = y.to(device)

    def run() -> None:
        folding = contextlib.nullcontext() if name.endswith("fold") else mock.patch.object(
            attack_module, "folded_batchnorm", contextlib.nullcontext)
        with folding:
            if args.what == "attack":
                with autocast(args.precision, device):
                    objective.perturb(model, x, y)
            else:
                train_step(model, optimizer, objective, x, y, precision=args.precision, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="small_resnet", help="a registered architecture or timm:NAME")
    parser.add_argument("--method", default="fgsm-rs", choices=("fgsm-rs", "pgd"))
    parser.add_argument("--attack-steps", type=int, default=7, help="PGD steps (--method pgd)")
    parser.add_argument("--eps", type=float, default=0.5, help="L2 eps in [0, 1] pixel units")
    parser.add_argument("--what", default="step", choices=("step", "attack"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--size", type=int, default=0, help="image side (default 28 for small_resnet, else 32)")
    parser.add_argument("--channels", type=int, default=0, help="input channels (default 1 for small_resnet, else 3)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", default=None, help="write every timing here")
    args = parser.parse_args()
    small = args.arch.startswith("small_resnet")
    side = args.size or (28 if small else 32)
    channels = args.channels or (1 if small else 3)
    tune_malloc()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    base = create_model(args.arch, num_classes=10, in_channels=channels, mean=0.5, std=0.25)
    x = torch.rand(args.batch_size, channels, side, side)
    y = torch.randint(0, 10, (args.batch_size,))
    names = args.variants.split(",")
    runs = {name: _variant(name, base, x, y, args, device) for name in names}
    for run in runs.values():
        run()  # untimed: allocations and kernel choices
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(args.rounds):
        for name in names[index % len(names):] + names[:index % len(names)]:
            started = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.arch}, {args.what} of {args.method}, batch {args.batch_size} x {channels} x {side} px, "
          f"{args.precision} on {device}, {args.rounds} rounds")
    for name in names:
        print(f"  {name:10s} {medians[name] * 1e3:9.1f} ms  (range {min(times[name]) * 1e3:.0f}-"
              f"{max(times[name]) * 1e3:.0f})")
    ratios = {}
    for slow, fast in RATIOS:
        if slow in times and fast in times:
            same_round = statistics.median(a / b for a, b in zip(times[slow], times[fast], strict=True))
            ratios[f"{slow}/{fast}"] = same_round
            print(f"  {slow} / {fast}: {same_round:.2f}x (same-round median)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                       "settings": vars(args), "device": str(device), "times": times, "medians": medians,
                       "same_round_ratios": ratios}, handle, indent=2)


if __name__ == "__main__":
    main()
