"""Training: one loop (loop.py) and the objectives that turn a batch into a loss."""

from .config import PretrainConfig
from .loop import PretrainResult, pretrain
from .objectives import METHODS, make_objective

__all__ = ["METHODS", "PretrainConfig", "PretrainResult", "make_objective", "pretrain"]
