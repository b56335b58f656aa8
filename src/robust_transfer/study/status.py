"""Where a study stands: done / running / failed / left, and an estimate of the time remaining."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from .store import RunRow, Store


@dataclass
class StudyStatus:
    """Counts per state, the failed and running runs, and the estimated seconds left (None: no basis yet)."""

    counts: dict[str, int]
    failed: list[RunRow] = field(default_factory=list)
    running: list[RunRow] = field(default_factory=list)
    eta_s: float | None = None
    workers: int = 0

    @property
    def finished(self) -> bool:
        return self.counts["pending"] + self.counts["running"] == 0


def _kind_of(row: RunRow) -> str:
    """Runs of one kind (transfers split by mode) take similar times: the unit of the estimate."""
    if row.kind == "transfer":
        return f"transfer {row.config['transfer']['mode']}"
    if row.kind == "detect":
        return f"detect {row.config['detect']['task']}"
    return row.kind


def study_status(store: Store) -> StudyStatus:
    """Read the store's state; the estimate divides the expected run times left by the workers active now."""
    rows = store.rows()
    counts = store.counts()
    durations: dict[str, list[float]] = {}
    for row in rows:
        if row.status == "done" and row.seconds is not None:
            durations.setdefault(_kind_of(row), []).append(row.seconds)
    running = [r for r in rows if r.status == "running"]
    failed = [r for r in rows if r.status == "failed"]
    failed_keys = {r.key for r in failed}
    left = [r for r in rows if r.status == "pending" and r.depends_on not in failed_keys] + running
    workers = len({r.owner for r in running})
    eta = None
    if durations:
        overall = statistics.mean(s for values in durations.values() for s in values)
        means = {kind: statistics.mean(values) for kind, values in durations.items()}
        now = time.time()
        total = 0.0
        for row in left:
            expected = means.get(_kind_of(row), overall)
            if row.status == "running" and row.started:
                expected = max(0.0, expected - (now - row.started))
            total += expected
        eta = total / max(workers, 1)
    return StudyStatus(counts=counts, failed=failed, running=running, eta_s=eta, workers=workers)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def format_status(status: StudyStatus, store_path: str) -> str:
    """The status as the ``study status`` command prints it."""
    c = status.counts
    lines = [f"{store_path}: {c['done']} done, {c['running']} running, {c['failed']} failed, "
             f"{c['pending']} left" + (f", {c['blocked']} blocked by a failed run" if c["blocked"] else "")]
    if status.finished:
        lines.append("nothing left to run" + ("" if not c["failed"] else
                                              "; retry the failed runs with `robust-transfer study retry STORE`"))
    elif status.eta_s is not None:
        lines.append(f"about {_duration(status.eta_s)} left at {max(status.workers, 1)} worker(s)")
    else:
        lines.append("time left: unknown until a run finishes")
    now = time.time()
    for row in status.running:
        elapsed = f", {_duration(now - row.started)} so far" if row.started else ""
        lines.append(f"  running  {row.key[:12]}  {row.label}  ({row.owner}{elapsed})")
    for row in status.failed:
        reason = (row.error or "").strip().splitlines()[-1:] or ["no error recorded"]
        lines.append(f"  failed   {row.key[:12]}  {row.label}: {reason[0]}")
    return "\n".join(lines)
