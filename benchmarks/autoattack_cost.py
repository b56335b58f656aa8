"""AutoAttack's cost on a small robust model: ours (the Attack value, `evaluate`) against calling torchattacks'
AutoAttack directly, on the same images and settings, and the fast ``apgd`` choice's gap to the full attack.

A small_resnet is trained on Fashion-MNIST for one epoch with FGSM-RS at Linf 8/255 (seeded), then attacked
at Linf 8/255 on ``--examples`` test images with APGD/FAB at ``--steps`` iterations (torchattacks'
AutoAttack uses 10; the reference code 100) and Square at 5,000 queries. Seconds are scaled to 1,000 images.

    PYTHONPATH=src .venv/bin/python benchmarks/autoattack_cost.py --json benchmarks/results/FILE.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torchattacks

from robust_transfer import Attack, ThreatModel, evaluate, load_dataset, load_model, pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out-dir", default="runs/bench-autoattack")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    threat = ThreatModel("linf", 8 / 255)
    run = pretrain(dataset="fashion-mnist", arch="small_resnet", method="fgsm-rs", norm="linf", eps=8 / 255,
                   epochs=1, train_examples=16000, lr=0.05, warmup_epochs=0.5, test_examples=200, test_steps=10,
                   progress=False, out_dir=args.out_dir, resume=True)
    model = load_model(run.model_path)
    data = load_dataset("fashion-mnist")
    x = data.test.images[: args.examples].float() / 255
    y = data.test.labels[: args.examples]
    scale = 1000 / args.examples
    rows = {}

    def timed(name, work):
        started = time.perf_counter()
        robust = work()
        rows[name] = {"robust_acc": robust, "seconds_per_1000": (time.perf_counter() - started) * scale}
        print(f"{name:>24}: robust {robust:.3f}, {rows[name]['seconds_per_1000']:.0f} s per 1,000 images", flush=True)

    timed("pgd-20", lambda: evaluate(model, (x, y), attack=Attack(threat, steps=20)).robust_acc)
    timed("ours apgd", lambda: evaluate(model, (x, y), attack=Attack(threat, steps=args.steps, kind="apgd")).robust_acc)
    timed("ours autoattack", lambda: evaluate(model, (x, y), attack=Attack(threat, steps=args.steps,
                                                                            kind="autoattack")).robust_acc)

    def theirs() -> float:
        attack = torchattacks.AutoAttack(model.eval(), norm="Linf", eps=threat.eps, n_classes=10, seed=0)
        with torch.no_grad():
            return float((model(attack(x, y)).argmax(1) == y).float().mean())

    timed("torchattacks autoattack", theirs)
    print(f"clean {evaluate(model, (x, y)).clean_acc:.3f} on {args.examples} images")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"settings": vars(args), "results": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
