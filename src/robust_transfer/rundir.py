"""Output folders: checked before any work starts, so a bad path fails in a second, not after hours."""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import RobustTransferError

MIN_FREE_BYTES = 200 * 2**20


def prepare_output_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and check that it is writable with some disk space left."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise RobustTransferError(f"cannot write to the output folder {path}: {error.strerror}") from None
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise RobustTransferError(
            f"only {free / 2**20:.0f} MiB free on the disk of {path}: free some space or choose another output folder")
    return path
