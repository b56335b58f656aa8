"""Per-epoch metrics as JSON lines (one object per epoch) and TensorBoard scalars."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text

log = logging.getLogger(__name__)


class MetricsLog:
    """Append-only metrics of one run; on resume, entries past the checkpoint are dropped.

    A crash after a metrics line but before its checkpoint would otherwise leave that epoch
    twice in the file once the run resumes.
    """

    def __init__(self, run_dir: Path, resume_epoch: int, enabled: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._writer = None
        if not enabled:
            return
        kept = [entry for entry in self.read(self.path) if entry.get("epoch", 0) <= resume_epoch]
        atomic_write_text(self.path, "".join(json.dumps(entry) + "\n" for entry in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional at run time
            log.warning("tensorboard is not installed: metrics go to %s only", self.path)
        else:
            self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_epoch + 1)

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        entries = []
        for line in path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a crash
                continue
        return entries

    def write(self, entry: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
        if self._writer is not None:
            for key, value in entry.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self._writer.add_scalar(key, value, entry["epoch"])
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
