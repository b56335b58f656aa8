"""Executors: where a study's runs execute. Both record through the same store, one run at most once.

- ``local``: worker processes on this machine, each claiming runs from the store itself (or, with one
  worker, this process). A worker that dies is replaced; its run goes back to pending.
- ``ray``: this process claims runs and sends each to a Ray cluster as a task; results come back here
  and only this process writes the store. Run folders must be on a filesystem the cluster shares.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..errors import RobustTransferError
from .execute import describe_error, execute_run
from .plan import Run
from .store import Claim, Store, worker_identity
from .worker import IDLE_POLL_S, Heartbeat, work

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")


def default_workers() -> int:
    """One worker per two cores: two threads per worker keep a small model's kernels busy."""
    return max(1, (os.cpu_count() or 1) // 2)


class _ProgressBar:
    """A bar over all runs of the store, fed by polling its counts."""

    def __init__(self, store: Store, enabled: bool) -> None:
        self.store = store
        counts = store.counts()
        self.bar = tqdm(total=sum(counts.values()) - counts["blocked"], desc="study", unit="run", disable=not enabled)
        self.update()

    def update(self, label: str | None = None) -> None:
        counts = self.store.counts()
        self.bar.n = counts["done"] + counts["failed"]
        self.bar.set_postfix(running=counts["running"], failed=counts["failed"], refresh=False)
        if label:
            self.bar.set_description_str(label[:60], refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.update()
        self.bar.close()


def run_local(store_path: str | Path, workers: int | None = None, progress: bool = True,
              lease_s: float | None = None) -> None:
    """Execute the store's runs with ``workers`` processes on this machine (1: in this process)."""
    workers = workers or default_workers()
    if workers < 1:
        raise RobustTransferError(f"workers must be >= 1, got {workers}")
    store = Store(store_path)
    bar = _ProgressBar(store, progress)
    try:
        with _log_lines_above(progress):
            if workers == 1:
                work(store_path, lease_s=lease_s, on_start=lambda claim: bar.update(claim.run.label),
                     on_finish=lambda claim, outcome: bar.update())
            else:
                _supervise(store, Path(store_path), workers, bar, lease_s)
    finally:
        bar.close()
        store.close()


def _log_lines_above(progress: bool):
    """Log lines printed above the bar instead of through it."""
    return logging_redirect_tqdm() if progress else contextlib.nullcontext()


def _supervise(store: Store, store_path: Path, workers: int, bar: _ProgressBar, lease_s: float | None) -> None:
    """Start worker processes, replace those that die while work is left, wait for all to finish."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch thread pools
    threads = max(1, (os.cpu_count() or 1) // workers)
    start = lambda: _started(context.Process(target=_worker_main, args=(str(store_path), threads, lease_s),
                                             daemon=False))
    processes = [start() for _ in range(workers)]
    replacements = 3 * workers
    try:
        while processes:
            time.sleep(IDLE_POLL_S)
            bar.update()
            for process in list(processes):
                if process.is_alive():
                    continue
                processes.remove(process)
                if process.exitcode != 0 and replacements > 0 and store.runnable_left():
                    log.warning("a study worker exited with code %s; starting another", process.exitcode)
                    store.requeue_stale()
                    replacements -= 1
                    processes.append(start())
    except BaseException:
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout=10)
        raise


def _started(process: multiprocessing.Process) -> multiprocessing.Process:
    process.start()
    return process


def _worker_main(store_path: str, threads: int, lease_s: float | None) -> None:
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    work(store_path, lease_s=lease_s)


def run_ray(store_path: str | Path, address: str | None = None, max_parallel: int | None = None,
            cpus_per_run: float = 1.0, progress: bool = True, lease_s: float | None = None) -> None:
    """Execute the store's runs as Ray tasks on the cluster at ``address`` (None: start a local Ray)."""
    try:
        import ray
    except ImportError:
        raise RobustTransferError("the ray executor needs Ray: pip install 'robust-transfer[ray]'") from None
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False,
                 **({} if address else {"num_cpus": os.cpu_count()}))
    except (ConnectionError, RuntimeError) as error:
        raise RobustTransferError(f"cannot reach a Ray cluster at {address}: {error}") from None
    capacity = max_parallel or max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_run))
    remote = ray.remote(num_cpus=cpus_per_run, max_retries=0)(_execute_remote)
    store = Store(store_path, **({"lease_s": lease_s} if lease_s else {}))
    heartbeat = Heartbeat(Path(store_path), store.lease_s)
    bar = _ProgressBar(store, progress)
    owner, host, pid = worker_identity()
    inflight: dict = {}
    try:
        with _log_lines_above(progress):
            while True:
                while len(inflight) < capacity and (claim := store.claim(owner, host, pid)) is not None:
                    heartbeat.add(claim.token)
                    inflight[remote.remote(claim.run)] = (claim, time.perf_counter())
                    bar.update(claim.run.label)
                if not inflight:
                    if not store.runnable_left():
                        return
                    time.sleep(IDLE_POLL_S)
                    continue
                finished, _ = ray.wait(list(inflight), num_returns=1, timeout=IDLE_POLL_S * 5)
                for ref in finished:
                    claim, started = inflight.pop(ref)
                    _record_remote(store, claim, lambda ref=ref: ray.get(ref), time.perf_counter() - started)
                    heartbeat.discard(claim.token)
                    bar.update()
    except BaseException:
        for claim, _ in inflight.values():
            store.release(claim)
        raise
    finally:
        bar.close()
        heartbeat.close()
        store.close()


def _execute_remote(run: Run) -> dict:
    """The Ray task: a result, or the error as text (our errors need not be importable on the driver)."""
    try:
        return {"ok": True, "result": execute_run(run)}
    except Exception as error:
        return {"ok": False, "error": describe_error(error)}


def _record_remote(store: Store, claim: Claim, get: Callable[[], dict], seconds: float) -> None:
    try:
        reply = get()
    except Exception as error:  # the task's worker process died: a fault of the run, kept as its error
        reply = {"ok": False, "error": f"the Ray worker died: {error}"}
    if reply["ok"]:
        store.record_done(claim, reply["result"], seconds)
    else:
        log.warning("failed %s: %s", claim.run.label, reply["error"].splitlines()[-1])
        store.record_failed(claim, reply["error"], seconds)
