"""Penultimate-layer features of a frozen source model, extracted once and cached on disk.

The cache key covers the model's weights (a content hash), the dataset, the split and the
preprocessing, so a changed model or transform never reuses stale features.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_open, file_lock
from ..attack import eval_mode
from ..data import make_batches
from ..models.surgery import classifier_head, set_submodule
from ..runtime import autocast, prepare_batch, prepare_model

log = logging.getLogger(__name__)


def model_content_hash(model: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of every tensor in the state dict."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def feature_extractor(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose classifier head is the identity: it outputs penultimate features."""
    extractor = copy.deepcopy(model)
    inner = extractor.model if hasattr(extractor, "model") else extractor
    head_name, _ = classifier_head(inner)
    set_submodule(inner, head_name, nn.Identity())
    return extractor


@torch.no_grad()
def extract_features(extractor: nn.Module, dataset, device: torch.device, precision: str,
                     batch_size: int = 256, progress: bool = False, description: str = "features"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32 [N, D], labels int64 [N]) of ``dataset`` in order, in eval mode."""
    extractor = prepare_model(extractor, device)
    features, labels = [], []
    batches = make_batches(dataset, batch_size, shuffle=False)
    with eval_mode(extractor), autocast(precision, device):
        for x, y in tqdm(batches, desc=description, unit="batch", leave=False, disable=not progress):
            features.append(extractor(prepare_batch(x, device)).float().flatten(1).cpu())
            labels.append(y)
    return torch.cat(features), torch.cat(labels)


class FeatureCache:
    """Features on disk, one safetensors file per (model, dataset, split, preprocessing) key."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    @staticmethod
    def key(**parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.safetensors"

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            tensors = load_file(path)
            return tensors["features"], tensors["labels"]
        except Exception as error:  # a foreign or damaged cache file: recompute rather than fail
            log.warning("ignoring unreadable feature cache %s (%s)", path, error)
            return None

    def get_or_compute(self, key: str, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                       ) -> tuple[tuple[torch.Tensor, torch.Tensor], bool]:
        """(features, labels) under ``key`` and whether they came from the cache.

        Computed under a per-key file lock: processes that need the same features at once (the
        runs of a study) extract them once; the others wait and read the result.
        """
        cached = self.get(key)
        if cached is not None:
            return cached, True
        with file_lock(self.directory / f".{key}.lock"):
            cached = self.get(key)
            if cached is not None:
                return cached, True
            computed = compute()
            self.put(key, *computed)
            return computed, False

    def put(self, key: str, features: torch.Tensor, labels: torch.Tensor) -> None:
        data = save({"features": features.contiguous(), "labels": labels.contiguous()})
        with atomic_open(self.path(key)) as handle:
            handle.write(data)
