"""`run_study`: plan a spec into the store and execute what is left; the entry point of `study run`."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import RobustTransferError
from ..rundir import prepare_output_dir
from .executors import EXECUTORS, run_local, run_ray
from .plan import plan_runs
from .spec import StudySpec, load_spec
from .store import Store

STORE_NAME = "study.sqlite"


def store_path_for(spec: StudySpec) -> Path:
    """Where a spec's store lives by default: ``<out_dir>/study.sqlite``."""
    return Path(spec.out_dir) / STORE_NAME


def resolve_store(path: str | Path) -> Path:
    """A store path from what a user typed: the store itself, its folder, or the spec that made it."""
    path = Path(path)
    if path.suffix == ".toml":
        return store_path_for(load_spec(path))
    if path.is_dir():
        return path / STORE_NAME
    return path


def plan_study(spec: StudySpec, store_path: str | Path | None = None) -> tuple[Path, int]:
    """Add the spec's runs to its store (runs already there are kept); returns (store path, new runs)."""
    prepare_output_dir(spec.out_dir)
    path = Path(store_path) if store_path else store_path_for(spec)
    with Store(path) as store:
        added = store.add_runs(plan_runs(spec))
        store.set_meta("name", spec.name)
        store.set_meta("spec", json.dumps(spec.to_dict()))
    return path, added


def run_study(spec: StudySpec | str | Path, executor: str = "local", workers: int | None = None,
              address: str | None = None, store_path: str | Path | None = None, progress: bool = True) -> Path:
    """Run every run of ``spec`` not finished yet and return the store's path.

    Safe to call again after a crash or a kill, and from several processes at once: finished runs
    are kept, interrupted ones start again (pretraining from its last checkpoint), and no run is
    executed or recorded twice.
    """
    if executor not in EXECUTORS:
        raise RobustTransferError(f"unknown executor {executor!r}: use one of {', '.join(EXECUTORS)}")
    if not isinstance(spec, StudySpec):
        spec = load_spec(spec)
    path, _ = plan_study(spec, store_path)
    if executor == "ray":
        run_ray(path, address=address, max_parallel=workers, progress=progress)
    else:
        run_local(path, workers=workers, progress=progress)
    return path
