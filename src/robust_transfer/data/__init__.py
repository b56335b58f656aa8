"""Datasets: a registry of loaders, seeded splits and deterministic mini-batches.

Every dataset returns unnormalised float images in [0, 1], NCHW; models normalise inside.
"""

from . import transfer_sets  # noqa: F401  (registers the 12 transfer datasets)
from .batches import AUGMENTATIONS, make_batches
from .memory import InMemoryDataset
from .registry import DatasetEntry, LoadRequest, list_datasets, load_dataset, register_dataset, sample_examples
from .splits import DatasetSplits

__all__ = [
    "AUGMENTATIONS", "DatasetEntry", "DatasetSplits", "InMemoryDataset", "LoadRequest", "sample_examples",
    "list_datasets", "load_dataset", "make_batches", "register_dataset",
]
