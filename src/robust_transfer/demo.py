"""The demo: standard vs L2-robust pretraining on Fashion-MNIST, clean and robust accuracy, and
fixed-feature transfer of both to Animal-MNIST, MNIST-5k and digits.

Finished runs and extracted features are reused, so a second call only re-evaluates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .data import load_dataset
from .evaluation import evaluate
from .models import load_model
from .threat import ThreatModel
from .train import PretrainConfig, pretrain
from .transfer import transfer

TARGETS = ("animal-mnist", "mnist-5k", "digits")


@dataclass(frozen=True)
class DemoSize:
    train_examples: int
    epochs: int
    eval_examples: int


# Full: a few minutes on a 2-core CPU; quick: about a minute, for CI and a first look.
FULL = DemoSize(train_examples=20_000, epochs=4, eval_examples=1000)
QUICK = DemoSize(train_examples=4096, epochs=2, eval_examples=300)
SOURCE_EPS = (0.0, 1.0)
ATTACK_EPS = (0.5, 1.0)
ATTACK_STEPS = 20


def run_demo(out_dir: str | Path = "runs/demo", quick: bool = False, progress: bool = True) -> str:
    """Pretrain a small ResNet at each eps in SOURCE_EPS and return the accuracy table as text."""
    size = QUICK if quick else FULL
    out_dir = Path(out_dir) / ("quick" if quick else "full")
    data = load_dataset("fashion-mnist")
    rows, transfers = [], []
    for eps in SOURCE_EPS:
        config = PretrainConfig(
            dataset="fashion-mnist", arch="small_resnet", method="pgd" if eps else "standard", norm="l2",
            eps=eps, attack_steps=3, epochs=size.epochs, batch_size=128, lr=0.05, warmup_epochs=0.5,
            train_examples=size.train_examples, eval_examples=256, eval_steps=5, test_examples=size.eval_examples,
            out_dir=str(out_dir / f"fashion-mnist-l2-eps{eps:g}"), resume=True, progress=progress)
        run = pretrain(config)
        model = load_model(run.model_path)
        accuracies = [evaluate(model, data.test, ThreatModel("l2", attack), steps=ATTACK_STEPS,
                               max_examples=size.eval_examples, precision="auto") for attack in ATTACK_EPS]
        rows.append((eps, accuracies[0].clean_acc, [a.robust_acc for a in accuracies]))
        transfers.append((eps, [transfer(source=str(run.model_path), dataset=target, mode="fixed",
                                         out_dir=str(out_dir / f"transfer-eps{eps:g}-{target}"),
                                         cache_dir=str(out_dir / "features"), progress=progress).test_score
                                for target in TARGETS]))
    return _table(rows, size, out_dir) + "\n\n" + _transfer_table(transfers)


def _transfer_table(transfers) -> str:
    header = ["source model (L2 eps)"] + list(TARGETS)
    lines = ["Fixed-feature transfer (new last layer, L-BFGS on cached features), test accuracy", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for eps, scores in transfers:
        name = "standard (eps 0)" if eps == 0 else f"robust (eps {eps:g})"
        lines.append("| " + " | ".join([name] + [f"{100 * s:.1f}%" for s in scores]) + " |")
    wins = sum(robust > standard for standard, robust in zip(transfers[0][1], transfers[-1][1], strict=True))
    lines += ["", f"The robust source transfers better on {wins} of {len(TARGETS)} targets."]
    return "\n".join(lines)


def _table(rows, size: DemoSize, out_dir: Path) -> str:
    header = ["source model (L2 eps)", "clean"] + [f"PGD-{ATTACK_STEPS} L2 eps {a:g}" for a in ATTACK_EPS]
    lines = [
        f"Fashion-MNIST, small_resnet, {size.epochs} epochs on {size.train_examples} images; "
        f"accuracy on {size.eval_examples} test images",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for eps, clean, robust in rows:
        name = "standard (eps 0)" if eps == 0 else f"robust (eps {eps:g})"
        lines.append("| " + " | ".join([name, f"{100 * clean:.1f}%"] + [f"{100 * r:.1f}%" for r in robust]) + " |")
    (_, _, standard_robust), (robust_eps, _, robust_robust) = rows[0], rows[-1]
    gap = 100 * (robust_robust[-1] - standard_robust[-1])
    verdict = "more" if gap > 0 else "not more"
    lines += ["", f"Under the L2 eps {ATTACK_EPS[-1]:g} attack the eps {robust_eps:g} model is {verdict} robust "
                  f"than the standard one ({gap:+.1f} points).", f"Runs, models and metrics: {out_dir}"]
    return "\n".join(lines)
