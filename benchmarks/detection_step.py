"""Detection fine-tuning step: our engine (bf16 autocast + channels_last) against torchvision's plain fp32 loop.

Both train the same Faster R-CNN (or Mask R-CNN) over the same source's stages, built by `build_detector`
from the same seed, on the same batches of the embedded scenes (or a detection folder). The plain loop is
what torchvision's reference scripts do: ``sum(model(images, targets).values()).backward()``, SGD step,
fp32, NCHW. Ours is `train_step` with `DetectionObjective`, the step `robust-transfer detect` runs.
Rounds alternate between the contenders so the shared machine's noise hits both; the figure is the
ratio of median step times.

    PYTHONPATH=src .venv/bin/python benchmarks/detection_step.py --rounds 6 --steps 3
    PYTHONPATH=src .venv/bin/python benchmarks/detection_step.py --arch resnet50 --image-size 512 --batch-size 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from robust_transfer.data.detection import DetectionDataset, detection_batches, read_detection_data
from robust_transfer.data.scenes import embedded_scenes
from robust_transfer.detect.config import DATASET_SHAPE, SCENES_SHAPE
from robust_transfer.detect.detector import build_detector
from robust_transfer.detect.objective import DetectionObjective
from robust_transfer.models import create_model
from robust_transfer.runtime import prepare_model, resolve_precision, tune_malloc
from robust_transfer.train.step import train_step


def _detector(args, num_classes: int, channels: int):
    torch.manual_seed(0)
    source = create_model(args.arch, 10, channels)
    shape = SCENES_SHAPE if args.image_size is None else \
        DATASET_SHAPE.__class__(**{**DATASET_SHAPE.__dict__, "min_size": args.image_size, "max_size": args.image_size})
    return build_detector(source, num_classes, task=args.task, shape=shape)


def _plain_step(model, optimizer, images, targets) -> None:
    model.train()
    loss = sum(model(images, targets).values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="small_resnet")
    parser.add_argument("--task", default="detection", choices=("detection", "instance-segmentation"))
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize images to this side (default: the scenes' 96 px, their narrow heads)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per contender per round")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    tune_malloc()
    device = torch.device("cpu")
    channels = 1 if args.arch == "small_resnet" else 3
    data = read_detection_data(embedded_scenes(), task=args.task)
    dataset = DetectionDataset(data.train, channels=channels, masks=args.task == "instance-segmentation")
    batches = list(detection_batches(dataset, args.batch_size, indices=dataset.with_objects(), shuffle=True,
                                     flip=True, drop_last=True))[:args.steps + 1]
    ours_precision = resolve_precision("auto", device)
    contenders = {}
    for name, precision in (("ours", ours_precision), ("plain", "fp32")):
        model = _detector(args, len(data.class_names), channels)
        model = prepare_model(model, device) if name == "ours" else model
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        contenders[name] = (model, optimizer, precision)
    objective = DetectionObjective()

    def run(name: str, batch) -> None:
        model, optimizer, precision = contenders[name]
        if name == "plain":
            _plain_step(model, optimizer, *batch)
        else:
            x, y = objective.to_device(*batch, device)
            train_step(model, optimizer, objective, x, y, precision=precision, device=device)

    times: dict[str, list[float]] = {name: [] for name in contenders}
    for name in contenders:  # warm-up: first-call allocations and oneDNN kernel selection
        run(name, batches[0])
    for round_index in range(args.rounds):
        order = list(contenders) if round_index % 2 == 0 else list(reversed(contenders))
        for name in order:
            for batch in batches[1:args.steps + 1]:
                started = time.perf_counter()
                run(name, batch)
                times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    report = {"arch": args.arch, "task": args.task, "image_size": args.image_size or "scenes (96)",
              "batch_size": args.batch_size, "ours_precision": ours_precision, "threads": torch.get_num_threads(),
              "median_step_s": medians, "speedup": medians["plain"] / medians["ours"],
              "steps_timed": {name: len(values) for name, values in times.items()}}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
