"""Decode + augment throughput from JPEG files: our streamed RandomResizedCrop path against torchvision's.

A folder of real photographs at ImageNet's typical 500 x 375 (`write_imagenet_sample`: crops of the photographs
installed packages ship, JPEG quality 90) is read, one epoch at a time, by

- ``ours``: `make_batches(..., augment="resized-crop-flip", num_workers=W)` over the folder's files, the path
  `pretrain --dataset imagenet` trains on (TorchCodec decode, torchvision.transforms.v2 RandomResizedCrop(224) +
  flip in the workers, uint8 to the main process, float [0, 1] batches out);
- ``torchvision``: `torchvision.datasets.ImageFolder` with RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor
  (PIL decode) and a DataLoader with the same workers and batch size: the usual ImageNet training loader.

The contenders alternate, epoch by epoch, after one untimed epoch each (the page cache then holds the files for
both); images/s per core = images/s / W, with W worker processes on W cores. ``--gpu-decode`` adds
``ours-nvjpeg`` (`pretrain --decode gpu`: the workers read bytes, nvJPEG decodes each batch on the GPU). It also
compares the crops' scale and aspect-ratio distributions with torchvision's (two-sample KS on 4,000 draws each)
and prints one JSON report.

    PYTHONPATH=src .venv/bin/python benchmarks/decode_augment.py --workers 1 2 --out benchmarks/results/X.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from scipy.stats import ks_2samp
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.transforms import v2

from robust_transfer.data import make_batches
from robust_transfer.data.folder import FolderDataset, scan_split
from robust_transfer.data.photo_sample import write_imagenet_sample
from robust_transfer.data.streaming import StreamedCrops

SIZE = 224


def ours(train: Path, workers: int, batch_size: int, epoch: int, decode_device: torch.device | None = None) -> int:
    paths, labels, names = scan_split(train, None)
    files = FolderDataset(paths, labels, names, SIZE, 3)
    seen = 0
    for x, _ in make_batches(files, batch_size, shuffle=True, seed=0, epoch=epoch, augment="resized-crop-flip",
                             num_workers=workers, device=decode_device, decode_device=decode_device):
        seen += len(x)
    if decode_device is not None:
        torch.cuda.synchronize()
    return seen


def ours_nvjpeg(train: Path, workers: int, batch_size: int, epoch: int) -> int:
    """`pretrain --decode gpu`: the workers read bytes, the batch is decoded by nvJPEG on the GPU and cropped there."""
    return ours(train, workers, batch_size, epoch, torch.device("cuda"))


def anchor(train: Path, workers: int, batch_size: int, epoch: int) -> int:
    transform = transforms.Compose([transforms.RandomResizedCrop(SIZE), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor()])
    loader = DataLoader(torchvision.datasets.ImageFolder(str(train), transform=transform), batch_size=batch_size,
                        shuffle=True, num_workers=workers, generator=torch.Generator().manual_seed(epoch))
    seen = 0
    for x, _ in loader:
        seen += len(x)
    return seen


def crop_statistics(draws: int = 4000) -> dict:
    """Our crops' (scale, log aspect) against torchvision's RandomResizedCrop on a 500 x 375 image."""
    crops = StreamedCrops([], torch.empty(0, dtype=torch.long), [], SIZE, 3)
    ours_boxes = [crops.crop_box(seed, 375, 500)[0] for seed in range(draws)]
    reference = v2.RandomResizedCrop(SIZE, antialias=True)
    image = torch.empty(3, 375, 500, dtype=torch.uint8)
    torch.manual_seed(12345)
    their_boxes = [reference.make_params([image]) for _ in range(draws)]

    def stats(boxes):
        return np.array([(b["height"] * b["width"] / (375 * 500), np.log(b["width"] / b["height"])) for b in boxes])

    a, b = stats(ours_boxes), stats(their_boxes)
    return {"draws": draws,
            "scale_mean": [float(a[:, 0].mean()), float(b[:, 0].mean())],
            "log_ratio_mean": [float(a[:, 1].mean()), float(b[:, 1].mean())],
            "scale_ks_p": float(ks_2samp(a[:, 0], b[:, 0]).pvalue),
            "log_ratio_ks_p": float(ks_2samp(a[:, 1], b[:, 1]).pvalue)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600, help="JPEG files in the folder (3 classes)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--gpu-decode", action="store_true", help="also time --decode gpu (needs a CUDA GPU)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the main process only collates and converts: the work is in the workers
    report = {"images": args.images, "image_size": [500, 375], "crop": SIZE, "batch_size": args.batch_size,
              "crop_statistics": crop_statistics(), "runs": {}}
    with tempfile.TemporaryDirectory() as folder:
        root = write_imagenet_sample(Path(folder) / "imagenet", train_per_class=args.images // 3, val_per_class=1)
        train = root / "train"
        for workers in args.workers:
            contenders = {"ours": ours, "torchvision": anchor}
            if args.gpu_decode:
                contenders["ours-nvjpeg"] = ours_nvjpeg
            rates = {name: [] for name in contenders}
            for run in contenders.values():  # untimed: page cache, worker start-up paths
                run(train, workers, args.batch_size, epoch=99)
            for round_ in range(args.rounds):
                order = list(contenders) if round_ % 2 == 0 else list(contenders)[::-1]
                for name in order:
                    started = time.perf_counter()
                    seen = contenders[name](train, workers, args.batch_size, epoch=round_)
                    rates[name].append(seen / (time.perf_counter() - started))
            ratios = [o / t for o, t in zip(rates["ours"], rates["torchvision"], strict=True)]
            report["runs"][f"{workers} workers"] = {
                "images_per_s": {k: [round(r, 1) for r in v] for k, v in rates.items()},
                "images_per_s_per_core": {k: round(statistics.median(v) / workers, 1) for k, v in rates.items()},
                "ratio_median": round(statistics.median(ratios), 3)}
            print(json.dumps({workers: report["runs"][f"{workers} workers"]}), flush=True)
    print(json.dumps(report, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
