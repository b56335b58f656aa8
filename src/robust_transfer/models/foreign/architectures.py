"""Naming the architecture of a state dict: its key names, head and stem, and the registered architectures
whose layout it has exactly."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import RobustTransferError
from ..registry import ARCHITECTURES, build_classifier
from ..state import signature
from ..surgery import classifier_head, first_conv


@dataclass(frozen=True)
class Probe:
    """An architecture's state-dict names and the names of its head and stem layers."""

    keys: frozenset[str]
    head: str | None
    stem: str | None


@functools.cache
def _probe_cached(arch: str, options: str) -> Probe:
    with torch.device("meta"):
        model = build_classifier(arch, 1000, 3, json.loads(options))
    return probe_module(model)


def probe(arch: str, options: Mapping[str, Any] | None = None) -> Probe:
    """State-dict names, classifier-head and stem layer names of ``arch`` (built weightless, on meta)."""
    return _probe_cached(arch, json.dumps(dict(options or {}), sort_keys=True))


def probe_module(model: nn.Module) -> Probe:
    """`Probe` of a built model."""
    try:
        head: str | None = classifier_head(model)[0]
    except RobustTransferError:
        head = None
    try:
        stem: str | None = first_conv(model)[0]
    except RobustTransferError:
        stem = None
    return Probe(frozenset(model.state_dict()), head, stem)


def classes_and_channels(weights: Mapping[str, torch.Tensor], found: Probe) -> tuple[int, int]:
    """(classes, input channels) read off the head's and stem's weight shapes (1000 and 3 when absent)."""
    head = weights.get(f"{found.head}.weight") if found.head else None
    stem = weights.get(f"{found.stem}.weight") if found.stem else None
    num_classes = int(head.shape[0]) if head is not None and head.dim() >= 1 and head.shape[0] > 0 else 1000
    in_channels = int(stem.shape[1]) if stem is not None and stem.dim() == 4 and stem.shape[1] > 0 else 3
    return num_classes, in_channels


def fill_batch_counts(weights: dict[str, torch.Tensor], keys: frozenset[str]) -> dict[str, torch.Tensor]:
    """Add BatchNorm ``num_batches_tracked`` counters when they are all that is missing."""
    # Files from torch < 0.4.1 have no BatchNorm num_batches_tracked; eval never reads it.
    missing = [k for k in keys if k.endswith(".num_batches_tracked") and k not in weights]
    if not missing or set(weights) | set(missing) != keys:
        return weights
    return {**weights, **{k: torch.tensor(0, dtype=torch.long) for k in missing}}


def has_names_of(weights: Mapping[str, torch.Tensor], arch: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``weights`` have exactly the key names of ``arch`` (missing BatchNorm counters allowed)."""
    keys = probe(arch, options).keys
    return frozenset(fill_batch_counts(dict(weights), keys)) == keys


def infer_architectures(weights: Mapping[str, torch.Tensor]) -> list[str]:
    """Registry architectures whose state dict has exactly these names and shapes (any class count)."""
    matches = []
    for arch, entry in ARCHITECTURES.items():
        found = probe(arch)
        candidate = fill_batch_counts(dict(weights), found.keys)
        if frozenset(candidate) != found.keys:
            continue
        num_classes, in_channels = classes_and_channels(candidate, found)
        with torch.device("meta"):
            reference = entry.build(num_classes, in_channels)
        if signature(reference.state_dict()) == signature(candidate):
            matches.append(arch)
    return matches

