"""The demo: the paper in miniature, as a study on the embedded data.

Pretrain a small ResNet on Fashion-MNIST at several L2 eps (0 = standard), measure each source's
clean and robust accuracy, transfer each to Animal-MNIST, MNIST-5k and digits in fixed-feature and
full-network modes, and write the paper's table, plots and an inversion grid (robust vs standard); with
``detection``, also fine-tune a Faster R-CNN over each source on the embedded scenes (the blog's detection table).
Models, features and finished runs are kept in a study store, so a second call only rewrites the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data.scenes import SCENES_NAME
from .study import Store, load_outcomes, load_pictures, parse_spec, run_study
from .study.report import write_report

TARGETS = ("animal-mnist", "mnist-5k", "digits")


@dataclass(frozen=True)
class DemoSize:
    source_eps: tuple[float, ...]
    train_examples: int
    epochs: int
    test_examples: int
    attack_steps: int
    attack_examples: int
    full_train_examples: int
    full_epochs: int
    detect_epochs: int


# Full: under 10 minutes on a 2-core CPU; quick: under 2 minutes, for CI and a first look.
FULL = DemoSize(source_eps=(0.0, 0.5, 1.0), train_examples=16_000, epochs=3, test_examples=1000, attack_steps=10,
                attack_examples=500, full_train_examples=3000, full_epochs=3, detect_epochs=8)
QUICK = DemoSize(source_eps=(0.0, 1.0), train_examples=4096, epochs=2, test_examples=300, attack_steps=5,
                 attack_examples=200, full_train_examples=2000, full_epochs=2, detect_epochs=2)
ATTACK_EPS = 1.0


def demo_spec(out_dir: Path, size: DemoSize, detection: bool = False) -> dict[str, Any]:
    """The demo as a study spec (the same document a user would write in TOML)."""
    spec = {
        "name": "demo",
        "out_dir": str(out_dir),
        "targets": list(TARGETS),
        "modes": ["fixed", "full"],
        "seeds": [0],
        "threat": {"norm": "l2", "eps": ATTACK_EPS, "steps": size.attack_steps, "examples": size.attack_examples},
        "sources": [{
            "label": "fashion-mnist",
            "eps": list(size.source_eps),
            "pretrain": {"dataset": "fashion-mnist", "arch": "small_resnet", "method": "pgd", "norm": "l2",
                         "attack_steps": 3, "epochs": size.epochs, "batch_size": 128, "lr": 0.05,
                         "warmup_epochs": 0.5, "train_examples": size.train_examples, "eval_examples": 256,
                         "eval_steps": 5, "test_examples": size.test_examples},
        }],
        # Short fine-tuning needs a larger rate than the paper's 150-epoch 0.01.
        "transfer": {"full": {"lrs": [0.1], "epochs": size.full_epochs, "train_examples": size.full_train_examples,
                              "refit": False}},
        "pictures": {"kinds": ["inversion"], "images": 8},  # Figure 3: robust vs standard inversions
    }
    if detection:
        spec.update(targets=[*TARGETS, SCENES_NAME], modes=[*spec["modes"], "detection"],
                    detect={"epochs": size.detect_epochs})
    return spec


def run_demo(out_dir: str | Path = "runs/demo", quick: bool = False, progress: bool = True,
             workers: int | None = None, detection: bool = False) -> str:
    """Run the demo study (reusing whatever is finished) and return what it measured, as text.

    ``detection`` adds a Faster R-CNN row per source on the embedded scenes (about 4 minutes per source on
    two cores; 1 minute with ``quick``), in the same store, so the classification runs are reused."""
    size = QUICK if quick else FULL
    out_dir = Path(out_dir) / ("quick" if quick else "full")
    spec = parse_spec(demo_spec(out_dir, size, detection), origin="demo")
    store_path = run_study(spec, workers=workers, progress=progress)
    with Store(store_path, create=False) as store:
        sources, transfers = load_outcomes(store)
        pictures = load_pictures(store)
        failed = store.rows(status="failed")
    report_dir = out_dir / "report"
    title = "robust-transfer demo: Fashion-MNIST sources, three embedded targets" + \
        (" and the embedded detection scenes" if detection else "")
    files = write_report(transfers, sources, report_dir, title=title, pictures=pictures)
    text = Path(files.markdown).read_text()
    lines = [text.rstrip(), "",
             f"Setup: small_resnet, {size.epochs} epochs on {size.train_examples} Fashion-MNIST images at L2 eps "
             f"{', '.join(f'{e:g}' for e in size.source_eps)}; robust accuracy under PGD-{size.attack_steps} L2 eps "
             f"{ATTACK_EPS:g} on {size.attack_examples} test images."
             + (f" Detection: Faster R-CNN over each source, {size.detect_epochs} epochs on the embedded scenes."
                if detection else ""),
             f"Report with plots: {files.html}", f"Study store: {store_path}"]
    if failed:
        lines.append(f"{len(failed)} run(s) failed: `robust-transfer study status {store_path}` lists them")
    return "\n".join(lines)
