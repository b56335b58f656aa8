"""The results store: one SQLite row per run, claimed and recorded in transactions.

A run moves pending -> running -> done | failed. Claiming is one ``BEGIN IMMEDIATE`` transaction,
so two workers (threads, processes or whole ``study`` commands on the same file) never take the
same run. Each claim carries a fresh token; a result is recorded only under the token that claimed
it, so a worker presumed dead that comes back cannot record a run twice. A running run whose
worker died (its process is gone, or its heartbeat is older than the lease) goes back to pending.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import RobustTransferError
from .plan import Run

SCHEMA_VERSION = "1"
DEFAULT_LEASE_S = 120.0
STATUSES = ("pending", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    label TEXT NOT NULL,
    config TEXT NOT NULL,
    depends_on TEXT,
    position INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'running', 'done', 'failed')),
    owner TEXT, host TEXT, pid INTEGER, token TEXT, heartbeat REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    started REAL, finished REAL, seconds REAL,
    result TEXT, error TEXT, software TEXT
);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status, position);
"""


@dataclass(frozen=True)
class Claim:
    """A run taken by one worker; ``token`` proves the claim when recording."""

    run: Run
    token: str


@dataclass(frozen=True)
class RunRow:
    """A run as the store has it."""

    key: str
    kind: str
    label: str
    config: dict[str, Any]
    depends_on: str | None
    status: str
    owner: str | None
    attempts: int
    started: float | None
    finished: float | None
    seconds: float | None
    result: dict[str, Any] | None
    error: str | None
    software: str | None


def worker_identity() -> tuple[str, str, int]:
    """(owner name, host, pid) of this process."""
    host, pid = socket.gethostname(), os.getpid()
    return f"{host}:{pid}", host, pid


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """A study's runs in one SQLite file. Safe to open from many processes at once."""

    def __init__(self, path: str | os.PathLike[str], lease_s: float = DEFAULT_LEASE_S, create: bool = True) -> None:
        self.path = Path(path)
        self.lease_s = lease_s
        if not create and not self.path.is_file():
            raise RobustTransferError(f"no study store at {self.path}: give the study.sqlite file that "
                                      "`robust-transfer study run` wrote (it lives in the spec's out_dir)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout = 60000")
            # WAL lets readers (status, report) work while a worker writes; synchronous=FULL keeps
            # every committed transaction across a power cut, not only a process crash.
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            with self._transaction():
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self._db.execute(statement)
                self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        except sqlite3.DatabaseError as error:
            raise RobustTransferError(f"{self.path} is not a usable study store: {error}") from None
        schema = self.meta("schema")
        if schema != SCHEMA_VERSION:
            raise RobustTransferError(f"{self.path} has store schema {schema}; this version reads {SCHEMA_VERSION}")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """An immediate (write-locking) transaction: committed on success, rolled back on any error."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- study description -------------------------------------------------------------------------

    def meta(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_meta(self, name: str, value: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def add_runs(self, runs: list[Run]) -> int:
        """Insert runs not in the store yet (keyed by run key); returns how many were new."""
        with self._transaction() as db:
            start = db.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM runs").fetchone()[0]
            before = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
            for offset, run in enumerate(runs):
                db.execute("INSERT OR IGNORE INTO runs (key, kind, label, config, depends_on, position) "
                           "VALUES (?, ?, ?, ?, ?, ?)",
                           (run.key, run.kind, run.label, json.dumps(run.config), run.depends_on, start + offset))
            return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] - before

    # -- claiming and recording --------------------------------------------------------------------

    def requeue_stale(self, now: float | None = None) -> int:
        """Send running runs of dead workers back to pending; returns how many."""
        now = time.time() if now is None else now
        host = socket.gethostname()
        with self._transaction() as db:
            return self._requeue_stale(db, now, host)

    def _requeue_stale(self, db: sqlite3.Connection, now: float, host: str) -> int:
        stale = []
        for key, run_host, pid, heartbeat in db.execute(
                "SELECT key, host, pid, heartbeat FROM runs WHERE status = 'running'"):
            dead_here = run_host == host and pid is not None and not _process_alive(pid)
            if dead_here or heartbeat is None or now - heartbeat > self.lease_s:
                stale.append(key)
        for key in stale:
            db.execute("UPDATE runs SET status = 'pending', owner = NULL, host = NULL, pid = NULL, token = NULL "
                       "WHERE key = ? AND status = 'running'", (key,))
        return len(stale)

    def claim(self, owner: str | None = None, host: str | None = None, pid: int | None = None,
              only: list[str] | None = None) -> Claim | None:
        """Take the first pending run whose dependency is done (among ``only`` keys if given), or None."""
        default_owner, default_host, default_pid = worker_identity()
        owner, host, pid = owner or default_owner, host or default_host, pid if pid is not None else default_pid
        now = time.time()
        with self._transaction() as db:
            self._requeue_stale(db, now, socket.gethostname())
            row = db.execute(
                "SELECT key, kind, label, config, depends_on FROM runs r WHERE status = 'pending' AND "
                "(depends_on IS NULL OR EXISTS (SELECT 1 FROM runs d WHERE d.key = r.depends_on AND "
                "d.status = 'done'))" + (f" AND key IN ({', '.join('?' * len(only))})" if only else "")
                + " ORDER BY position LIMIT 1", list(only or [])).fetchone()
            if row is None:
                return None
            token = uuid.uuid4().hex
            db.execute("UPDATE runs SET status = 'running', owner = ?, host = ?, pid = ?, token = ?, heartbeat = ?, "
                       "started = ?, attempts = attempts + 1 WHERE key = ?",
                       (owner, host, pid, token, now, now, row[0]))
        return Claim(Run(row[0], row[1], row[2], json.loads(row[3]), row[4]), token)

    def heartbeat(self, tokens: list[str], now: float | None = None) -> None:
        """Tell other workers these claims are alive."""
        if not tokens:
            return
        with self._transaction() as db:
            now = time.time() if now is None else now
            for token in tokens:
                db.execute("UPDATE runs SET heartbeat = ? WHERE token = ? AND status = 'running'", (now, token))

    def record_done(self, claim: Claim, result: dict[str, Any], seconds: float) -> bool:
        """Record a finished run; False (nothing written) when the claim was lost to another worker."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE runs SET status = 'done', result = ?, error = NULL, finished = ?, seconds = ?, software = ?, "
                "token = NULL WHERE key = ? AND token = ? AND status = 'running'",
                (json.dumps(result), time.time(), seconds, f"robust-transfer {__version__}", claim.run.key,
                 claim.token))
            return cursor.rowcount == 1

    def record_failed(self, claim: Claim, error: str, seconds: float) -> bool:
        """Record a failed run with its error; False when the claim was lost."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE runs SET status = 'failed', error = ?, finished = ?, seconds = ?, software = ?, token = NULL "
                "WHERE key = ? AND token = ? AND status = 'running'",
                (error, time.time(), seconds, f"robust-transfer {__version__}", claim.run.key, claim.token))
            return cursor.rowcount == 1

    def release(self, claim: Claim) -> None:
        """Give a claimed run back unfinished (an interrupted worker): pending again, attempt not counted."""
        with self._transaction() as db:
            db.execute("UPDATE runs SET status = 'pending', owner = NULL, host = NULL, pid = NULL, token = NULL, "
                       "attempts = MAX(attempts - 1, 0) WHERE key = ? AND token = ?", (claim.run.key, claim.token))

    def retry(self, keys: list[str] | None = None) -> list[str]:
        """Failed runs (all, or those whose key starts with one of ``keys``) back to pending; returns their keys."""
        with self._transaction() as db:
            failed = [k for (k,) in db.execute("SELECT key FROM runs WHERE status = 'failed'")]
            if keys:
                unknown = [k for k in keys if not any(f.startswith(k) for f in failed)]
                if unknown:
                    raise RobustTransferError(f"no failed run with key {unknown[0]!r} in {self.path}: "
                                              "`robust-transfer study status` lists the failed runs")
                failed = [f for f in failed if any(f.startswith(k) for k in keys)]
            for key in failed:
                db.execute("UPDATE runs SET status = 'pending', error = NULL WHERE key = ?", (key,))
            return failed

    # -- reading -----------------------------------------------------------------------------------

    def rows(self, kind: str | None = None, status: str | None = None) -> list[RunRow]:
        """Runs in plan order, optionally of one kind and/or status."""
        query, args = "SELECT key, kind, label, config, depends_on, status, owner, attempts, started, finished, " \
                      "seconds, result, error, software FROM runs WHERE 1 = 1", []
        if kind:
            query, args = query + " AND kind = ?", [*args, kind]
        if status:
            query, args = query + " AND status = ?", [*args, status]
        rows = []
        for r in self._db.execute(query + " ORDER BY position", args):
            rows.append(RunRow(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5], r[6], r[7], r[8], r[9], r[10],
                               json.loads(r[11]) if r[11] else None, r[12], r[13]))
        return rows

    def counts(self) -> dict[str, int]:
        """Runs per status, with ``blocked``: pending runs whose dependency failed."""
        counts = dict.fromkeys((*STATUSES, "blocked"), 0)
        for status, count in self._db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"):
            counts[status] = count
        counts["blocked"] = self._db.execute(
            "SELECT COUNT(*) FROM runs r JOIN runs d ON d.key = r.depends_on "
            "WHERE r.status = 'pending' AND d.status = 'failed'").fetchone()[0]
        counts["pending"] -= counts["blocked"]
        return counts

    def runnable_left(self) -> bool:
        """Whether any run could still start: pending (not blocked) or running somewhere."""
        counts = self.counts()
        return counts["pending"] + counts["running"] > 0
