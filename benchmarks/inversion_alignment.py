"""Perceptual alignment, measured: do a robust model's representation inversions look more like their targets
than a standard model's?

For each model, Fashion-MNIST test images are inverted from noise (uniform [0, 1]) with L2 PGD on the
penultimate-feature distance, and each inversion's Pearson correlation with its target image is computed
over pixels. Writes one grid (targets, then each model's inversions) and prints a JSON report.

    PYTHONPATH=src .venv/bin/python benchmarks/inversion_alignment.py STANDARD.safetensors ROBUST.safetensors \
        --labels standard robust --out benchmarks/results/inversion.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from robust_transfer.attack import Attack
from robust_transfer.models import load_model
from robust_transfer.visualize import feature_distance, invert_representation, save_grid
from robust_transfer.visualize.pictures import sample_test_images


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.flatten(1) - a.flatten(1).mean(1, keepdim=True), b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--labels", nargs="+", default=None)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--eps", type=float, default=40.0, help="L2 radius around the noise start (pixel units)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--step-size", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/inversion.png"))
    args = parser.parse_args()
    labels = args.labels or [Path(m).parent.name for m in args.models]
    targets, _ = sample_test_images("fashion-mnist", None, args.images, seed=0, channels=1)
    start = torch.rand(targets.shape, generator=torch.Generator().manual_seed(0))
    attack = Attack.of("l2", args.eps, steps=args.steps, step_size=args.step_size)
    rows, report = {"target": targets[:10]}, {}
    for label, path in zip(labels, args.models, strict=True):
        model = load_model(path).eval()
        inverted = invert_representation(model, targets, start, attack)
        correlation = pearson(inverted, targets)
        report[label] = {"pearson_mean": correlation.mean().item(), "pearson_std": correlation.std().item(),
                         "relative_feature_distance": (feature_distance(model, inverted, targets)
                                                       / feature_distance(model, start, targets)).mean().item()}
        rows[label] = inverted[:10]
    save_grid(rows, args.out)
    print(json.dumps({"images": args.images, "attack": attack.describe(), "grid": str(args.out), **report}, indent=2))


if __name__ == "__main__":
    main()
