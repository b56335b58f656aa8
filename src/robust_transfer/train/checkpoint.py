"""Per-epoch training checkpoints: everything needed to continue exactly, written atomically."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write
from ..errors import RobustTransferError

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` so that a crash leaves the previous checkpoint whole.

    Serialised in memory first: torch.save streaming into a file loses a full disk's OSError in its
    own "unexpected pos" error, while a plain write reports it as what it is.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        atomic_write(path, lambda handle: handle.write(buffer.getbuffer()))
    except OSError as error:
        raise RobustTransferError(f"cannot write the checkpoint {path}: {error.strerror or error}; the previous "
                                  "checkpoint is intact: free some disk space and continue with --resume") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with weights-only unpickling (no code in the file can run)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RobustTransferError(f"no checkpoint at {path}") from None
    except Exception as error:  # torch raises several types for a torn or foreign file
        raise RobustTransferError(
            f"cannot read checkpoint {path} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "delete it to start the run afresh"
        ) from None
