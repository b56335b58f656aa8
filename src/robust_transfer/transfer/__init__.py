"""Transfer learning: fixed-feature (cached features + L-BFGS heads, or the paper's SGD protocol),
full-network and partial fine-tuning."""

import sys
import types

from .api import TransferResult, transfer
from .config import TransferConfig

__all__ = ["TransferConfig", "TransferResult", "transfer"]


class _CallablePackage(types.ModuleType):
    """``robust_transfer.transfer`` names both this package and its main function. Once anything has imported
    the package, ``from robust_transfer import transfer`` finds the package, so calling it calls the function."""

    def __call__(self, *args, **kwargs) -> TransferResult:
        return transfer(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
