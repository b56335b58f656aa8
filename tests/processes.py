"""Killing runs the way a lost machine would: SIGKILL to a command and every process below it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from robust_transfer.train.checkpoint import load_checkpoint


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def kill_after_first_checkpoint(command: list[str], checkpoint: Path, epochs: int, env: dict | None = None) -> None:
    """Start ``command``, wait for its first ``checkpoint``, then SIGKILL it and all its processes at once (torchrun
    starts each worker in a session of its own, and workers and loader processes outlive a killed parent); check
    that the run had not finished its ``epochs``."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in [*descendants(process.pid), process.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists(), "the run stopped before its first checkpoint"
    assert load_checkpoint(checkpoint)["epoch"] < epochs, "the run finished before it could be killed"
