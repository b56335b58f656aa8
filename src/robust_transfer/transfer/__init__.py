"""Transfer learning: fixed-feature (cached features + L-BFGS heads, or the paper's SGD protocol),
full-network and partial fine-tuning."""

from .api import TransferResult, transfer
from .config import TransferConfig

__all__ = ["TransferConfig", "TransferResult", "transfer"]
