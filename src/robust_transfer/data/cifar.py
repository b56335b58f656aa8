"""CIFAR-10 and CIFAR-100 in their python-pickle layout, read from a local folder only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import RobustTransferError
from .memory import InMemoryDataset
from .safe_pickle import load_arrays

LAYOUTS = {
    "cifar10": {"folder": "cifar-10-batches-py", "archive": "cifar-10-python.tar.gz",
                "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
                "labels": "labels", "meta": "batches.meta", "names": "label_names"},
    "cifar100": {"folder": "cifar-100-python", "archive": "cifar-100-python.tar.gz",
                 "train": ["train"], "test": ["test"],
                 "labels": "fine_labels", "meta": "meta", "names": "fine_label_names"},
}


def _read(path: Path) -> dict:
    with open(path, "rb") as handle:
        content = load_arrays(handle, str(path), encoding="bytes")
    if not isinstance(content, dict):
        raise RobustTransferError(f"{path} does not hold a CIFAR batch (a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in content.items()}


def load_cifar(name: str, root: Path) -> tuple[InMemoryDataset, InMemoryDataset]:
    """(train, test) of ``name`` from ``root`` (the extracted folder or its parent)."""
    layout = LAYOUTS[name]
    folder = root / layout["folder"] if (root / layout["folder"]).is_dir() else root
    expected = layout["train"] + layout["test"] + [layout["meta"]]
    missing = [f for f in expected if not (folder / f).is_file()]
    if missing:
        found = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else "no such folder"
        raise RobustTransferError(
            f"{name} not found in {folder}: expected the python version's files {', '.join(expected)}; "
            f"missing {', '.join(missing)} (found: {found}). "
            f"Extract {layout['archive']} (the python version) there or pass --data-root; "
            "nothing is downloaded")
    meta = _read(folder / layout["meta"])
    if layout["names"] not in meta:
        raise RobustTransferError(
            f"{folder / layout['meta']} lacks {layout['names']!r}: not a {name} meta file")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[layout["names"]]]

    def split(files: list[str]) -> InMemoryDataset:
        """The images and labels of ``files`` concatenated."""
        images, labels = [], []
        for file in files:
            batch = _read(folder / file)
            try:
                images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.append(np.asarray(batch[layout["labels"]], dtype=np.int64))
            except (KeyError, ValueError) as error:
                raise RobustTransferError(f"{folder / file} is not a CIFAR batch ({error})") from None
        return InMemoryDataset(torch.from_numpy(np.concatenate(images)),
                               torch.from_numpy(np.concatenate(labels)), names)

    return split(layout["train"]), split(layout["test"])
