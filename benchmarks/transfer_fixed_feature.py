"""Fixed-feature transfer: our fast protocol (cached features + L-BFGS heads) vs the paper's SGD protocol.

Same source model and target data, in one run:
  1. one feature-extraction pass over train + val + test (the reference unit of time);
  2. ours: `transfer(mode="fixed", protocol="fast")` with a fresh cache, at least 10 penalties;
     1 and 2 alternate --repeats times after a warm-up pass, and the median ratio is reported;
  3. the paper's protocol: `transfer(mode="fixed", protocol="paper")` (SGD on the head through the
     frozen network, lr grid, x0.1 at 1/3 and 2/3 of training).

The paper trains 150 epochs per learning rate; --paper-epochs runs fewer and the report also gives the
time extrapolated linearly to 150 epochs. Run by hand:

    PYTHONPATH=src .venv/bin/python benchmarks/transfer_fixed_feature.py SOURCE.safetensors --dataset animal-mnist
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from robust_transfer.data import load_dataset
from robust_transfer.models import load_model
from robust_transfer.runtime import resolve_device, resolve_precision, tune_malloc
from robust_transfer.transfer import transfer
from robust_transfer.transfer.features import extract_features, feature_extractor

PAPER_EPOCHS = 150


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="source model file")
    parser.add_argument("--dataset", default="animal-mnist")
    parser.add_argument("--paper-epochs", type=int, default=10, help="epochs per lr for the paper protocol")
    parser.add_argument("--paper-lrs", type=float, nargs="+", default=[0.01, 0.001])
    parser.add_argument("--repeats", type=int, default=3,
                        help="extraction pass and fast run, alternated this many times; medians are reported")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    tune_malloc()
    device = resolve_device("auto")
    precision = resolve_precision("auto", device)

    source = load_model(args.source)
    data = load_dataset(args.dataset, image_size=source.metadata.get("input_size"),
                        in_channels=source.spec.in_channels)
    extractor = feature_extractor(source)

    def extraction_pass() -> float:
        started = time.perf_counter()
        for split in (data.train, data.val, data.test):
            extract_features(extractor, split, device, precision)
        return time.perf_counter() - started

    extraction_pass()  # warm-up: first-call allocations and kernel selection are not the unit of time
    with tempfile.TemporaryDirectory() as scratch:
        # Alternate the reference and ours so machine noise hits both alike; each fast run starts from
        # an empty feature cache, so it pays for its own extraction.
        extractions, fast_runs = [], []
        for repeat in range(args.repeats):
            extractions.append(extraction_pass())
            started = time.perf_counter()
            fast = transfer(source=args.source, dataset=args.dataset, mode="fixed", protocol="fast",
                            out_dir=f"{scratch}/fast{repeat}", cache_dir=f"{scratch}/cache{repeat}", progress=False)
            fast_runs.append(time.perf_counter() - started)
        extraction, fast_seconds = statistics.median(extractions), statistics.median(fast_runs)
        ratios = [f / e for f, e in zip(fast_runs, extractions, strict=True)]
        started = time.perf_counter()
        paper = transfer(source=args.source, dataset=args.dataset, mode="fixed", protocol="paper",
                         epochs=args.paper_epochs, lrs=args.paper_lrs, out_dir=f"{scratch}/paper", progress=False)
        paper_seconds = time.perf_counter() - started
    paper_150 = paper_seconds * PAPER_EPOCHS / args.paper_epochs
    figures = {
        "dataset": args.dataset, "device": str(device), "precision": precision, "threads": torch.get_num_threads(),
        "repeats": args.repeats, "extraction_s": extraction, "fast_s": fast_seconds,
        "fast_over_extraction": statistics.median(ratios), "fast_over_extraction_each": ratios,
        "fast_fit_s": fast.record["timings"]["fit_s"],
        "fast_test": fast.test_score, "fast_penalties": len(fast.record["selection"]["val_scores"]),
        "paper_epochs": args.paper_epochs, "paper_lrs": args.paper_lrs, "paper_s": paper_seconds,
        "paper_test": paper.test_score, "paper_150_epochs_s_extrapolated": paper_150,
        "speedup_at_run_epochs": paper_seconds / fast_seconds, "speedup_at_150_epochs": paper_150 / fast_seconds,
    }
    for key, value in figures.items():
        print(f"{key:34s} {value:.4g}" if isinstance(value, float) else f"{key:34s} {value}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
