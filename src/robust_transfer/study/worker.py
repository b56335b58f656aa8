"""A study worker: claim a run from the store, execute it, record it; repeat until nothing is left."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .execute import describe_error, execute_run
from .store import Claim, Store, worker_identity

log = logging.getLogger(__name__)

IDLE_POLL_S = 1.0


class Heartbeat:
    """Refreshes the heartbeat of the claims held by this process from a background thread.

    It uses its own connection, so it never shares one with the thread doing the work.
    """

    def __init__(self, store_path: Path, lease_s: float) -> None:
        self._store = Store(store_path, lease_s=lease_s)
        self._tokens: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._interval = max(0.5, lease_s / 6)
        self._thread = threading.Thread(target=self._beat, name="study-heartbeat", daemon=True)
        self._thread.start()

    def add(self, token: str) -> None:
        with self._lock:
            self._tokens.add(token)

    def discard(self, token: str) -> None:
        with self._lock:
            self._tokens.discard(token)

    def _beat(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                tokens = list(self._tokens)
            try:
                self._store.heartbeat(tokens)
            except Exception as error:  # a busy or briefly unreadable store: the next beat tries again
                log.debug("heartbeat failed: %s", error)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._store.close()


def work(store_path: str | Path, lease_s: float | None = None, only: list[str] | None = None,
         on_start: Callable[[Claim], None] | None = None,
         on_finish: Callable[[Claim, str], None] | None = None) -> None:
    """Execute runs from the store at ``store_path`` until none is left to start.

    ``only`` restricts the worker to those run keys (a retry of chosen runs). Otherwise a worker
    that finds only runs waiting on a dependency another worker is still running waits for it
    rather than stopping. ``on_finish`` gets each claim's outcome: done, failed or lost (finished
    after another worker had taken the run over; not recorded).
    """
    store = Store(store_path, **({"lease_s": lease_s} if lease_s else {}))
    heartbeat = Heartbeat(Path(store_path), store.lease_s)
    owner, host, pid = worker_identity()
    try:
        while True:
            claim = store.claim(owner, host, pid, only=only)
            if claim is None:
                if not only and store.runnable_left():
                    time.sleep(IDLE_POLL_S)
                    continue
                return
            heartbeat.add(claim.token)
            if on_start:
                on_start(claim)
            outcome = _execute_and_record(store, claim)
            heartbeat.discard(claim.token)
            if on_finish:
                on_finish(claim, outcome)
    finally:
        heartbeat.close()
        store.close()


def _execute_and_record(store: Store, claim: Claim) -> str:
    started = time.perf_counter()
    log.debug("start %s (%s)", claim.run.label, claim.run.key[:8])
    try:
        result = execute_run(claim.run)
    except KeyboardInterrupt:
        store.release(claim)
        raise
    except Exception as error:
        seconds = time.perf_counter() - started
        message = describe_error(error)
        log.warning("failed %s (%s): %s", claim.run.label, claim.run.key[:8], message.splitlines()[-1])
        return "failed" if store.record_failed(claim, message, seconds) else "lost"
    seconds = time.perf_counter() - started
    log.info("done %s in %.1f s", claim.run.label, seconds)
    return "done" if store.record_done(claim, result, seconds) else "lost"
