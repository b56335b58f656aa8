"""robust-transfer: adversarially robust pretraining, robust evaluation and transfer learning.

Every model takes images in [0, 1] (NCHW) and holds its own normalisation; eps is measured in
that [0, 1] pixel space.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public names and the module that defines each: imported on first use, so that
# `import robust_transfer` (and the command's --help) stays fast.
_EXPORTS = {
    "ThreatModel": "threat",
    "Attack": "attack",
    "RobustTransferError": "errors",
    "pgd": "attack",
    "fgsm": "attack",
    "evaluate": "evaluation",
    "EvalResult": "evaluation",
    "create_model": "models",
    "list_architectures": "models",
    "with_normalization": "models",
    "load_model": "models",
    "save_model": "models",
    "load_dataset": "data",
    "list_datasets": "data",
    "DatasetSplits": "data",
    "pretrain": "train",
    "PretrainConfig": "train",
    "PretrainResult": "train",
    "transfer": "transfer",
    "TransferConfig": "transfer",
    "TransferResult": "transfer",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .attack import Attack, fgsm, pgd  # noqa: F401
    from .data import DatasetSplits, list_datasets, load_dataset  # noqa: F401
    from .errors import RobustTransferError  # noqa: F401
    from .evaluation import EvalResult, evaluate  # noqa: F401
    from .models import create_model, list_architectures, load_model, save_model, with_normalization  # noqa: F401
    from .threat import ThreatModel  # noqa: F401
    from .train import PretrainConfig, PretrainResult, pretrain  # noqa: F401
    from .transfer import TransferConfig, TransferResult, transfer  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'robust_transfer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
