"""Killing runs the way a lost machine would: SIGKILL to a command and every process below it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
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


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], what: str, timeout: float = 300) -> None:
    """SIGKILL ``process`` and every process below it at once as soon as ``ready()`` (torchrun starts each worker
    in a session of its own, and workers and loader processes outlive a killed parent); fail, with the process's
    output when it was captured, if it ends first or ``what`` does not happen within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            output = process.communicate()[0] if process.stdout is not None else ""
            raise AssertionError(f"the run ended before {what}: {output}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    for pid in [*descendants(process.pid), process.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def kill_after_first_checkpoint(command: list[str], checkpoint: Path, epochs: int, env: dict | None = None) -> None:
    """Run ``command``, kill it (`kill_when`) once its first ``checkpoint`` is written, and check that it had not
    finished its ``epochs``."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                               start_new_session=True)
    kill_when(process, checkpoint.exists, "its first checkpoint")
    assert load_checkpoint(checkpoint)["epoch"] < epochs, "the run finished before it could be killed"
