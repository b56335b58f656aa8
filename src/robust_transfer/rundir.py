"""Output folders: checked before any work starts, so a bad path fails in a second, not after hours."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .atomic import file_lock
from .errors import RobustTransferError

MIN_FREE_BYTES = 200 * 2**20


def prepare_output_dir(path: str | Path, min_free_bytes: int | None = None) -> Path:
    """Create ``path`` if needed and check that it is writable with some disk space left.

    ``min_free_bytes`` is the free space the run needs on that disk (default ``MIN_FREE_BYTES``,
    200 MiB); a run that writes more, such as one with large checkpoints, can ask for more.
    Raises :class:`RobustTransferError` naming the folder and what to do.
    """
    path = Path(path)
    needed = MIN_FREE_BYTES if min_free_bytes is None else int(min_free_bytes)
    if needed < 0:
        raise RobustTransferError(f"min_free_bytes must be >= 0, got {min_free_bytes}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise RobustTransferError(
            f"cannot write to the output folder {path}: {error.strerror or error}; "
            "choose another output folder or make this one writable") from None
    free = shutil.disk_usage(path).free
    if free < needed:
        raise RobustTransferError(
            f"only {_mib(free)} free on the disk of {path} and this run needs at least {_mib(needed)}: "
            "free some space or choose another output folder")
    return path


LOCK_NAME = ".run.lock"


@contextlib.contextmanager
def exclusive_run(path: str | Path) -> Iterator[None]:
    """Hold ``path`` for one run at a time: a second run into it fails at once, naming the first.

    Two runs writing one folder (a resumed run started while the killed one's processes still
    live, for instance torchrun workers that outlive their agent) would mix their checkpoints.
    The lock is the kernel's (`file_lock`): a killed run never leaves it held.
    """
    path = Path(path)
    with contextlib.ExitStack() as held:
        try:
            handle = held.enter_context(file_lock(path / LOCK_NAME, wait=False))
        except BlockingIOError:
            holder = (path / LOCK_NAME).read_text().strip() or "unknown"
            raise RobustTransferError(
                f"another run (pid {holder}) is writing to {path}: wait for it to finish or stop it, "
                "or choose another output folder") from None
        if handle is not None:  # who holds it, for the message a second run gets
            handle.truncate(0)
            handle.write(str(os.getpid()))
            handle.flush()
        yield


@contextlib.contextmanager
def run_folder(path: str | Path, min_free_bytes: int | None = None) -> Iterator[Path]:
    """`prepare_output_dir` and `exclusive_run` for the length of a run, yielding the folder.

    A run that fails before writing anything (an unknown dataset, a missing model file) takes the
    folders it created with it, rather than leaving an empty run folder that looks like a run.
    """
    path = Path(path)
    created = [folder for folder in (path, *path.parents) if not folder.exists()]
    try:
        prepare_output_dir(path, min_free_bytes)
        with exclusive_run(path):
            yield path
    except BaseException:
        _remove_if_untouched(path, created)
        raise


def _remove_if_untouched(path: Path, created: list[Path]) -> None:
    with contextlib.suppress(OSError):
        if created and {p.name for p in path.iterdir()} <= {LOCK_NAME}:
            (path / LOCK_NAME).unlink(missing_ok=True)
            for folder in created:  # deepest first; stops at the first that holds something
                folder.rmdir()


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB"
