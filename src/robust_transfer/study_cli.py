"""``robust-transfer study run|status|retry`` and ``robust-transfer report``: thin layers over the study API."""

from __future__ import annotations

import argparse

SPEC_HELP = "the study spec (TOML): sources, targets, modes, grid, seeds, threat (see docs/STUDIES.md)"
STORE_HELP = "the study store (study.sqlite), its folder, or the spec that made it"


def _run(args: argparse.Namespace) -> int:
    from .study import run_study

    path = run_study(args.spec, executor=args.executor, workers=args.workers, address=args.address,
                     store_path=args.store, progress=args.progress)
    return _print_status(path)


def _print_status(path) -> int:
    from .study import Store, format_status, study_status

    with Store(path, create=False) as store:
        status = study_status(store)
    print(format_status(status, str(path)))
    if status.finished and status.counts["done"]:
        print(f"report: robust-transfer report {path} --out {path.parent / 'report'}")
    return 1 if status.counts["failed"] else 0


def _status(args: argparse.Namespace) -> int:
    from .study import resolve_store

    return _print_status(resolve_store(args.store))


def _retry(args: argparse.Namespace) -> int:
    from .study import Store, resolve_store
    from .study.worker import work

    path = resolve_store(args.store)
    with Store(path, create=False) as store:
        keys = store.retry(args.keys or None)
    if not keys:
        print("no failed runs to retry")
        return 0
    print(f"retrying {len(keys)} run(s)")
    if args.execute:
        work(path, only=keys)
    return _print_status(path)


def _report(args: argparse.Namespace) -> int:
    from .study import Store, load_outcomes, load_pictures, resolve_store
    from .study.report import write_report

    path = resolve_store(args.store)
    with Store(path, create=False) as store:
        sources, transfers = load_outcomes(store)
        pictures = load_pictures(store)
        title = args.title or f"Study {store.meta('name') or path.stem}"
    files = write_report(transfers, sources, args.out, title=title, pictures=pictures)
    print(f"report written to {args.out}:")
    for name, file in vars(files).items():
        for one in (file if isinstance(file, tuple) else [file] if file else []):
            print(f"  {name}: {one}")
    return 0


def add_study_parsers(commands: argparse._SubParsersAction) -> None:
    """Add the ``study`` and ``report`` commands to the top-level parser."""
    study = commands.add_parser(
        "study", help="run the paper's experiment grid (sources x targets x modes x grid x seeds)",
        description="A study runs every combination in a TOML spec and keeps each finished run in a SQLite "
                    "store. It is resumable: run it again after a crash or a kill and it continues where it "
                    "stopped; several `study run` processes can share one store.")
    actions = study.add_subparsers(dest="action", metavar="ACTION", required=True)

    run = actions.add_parser("run", help="run what is left of a study",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                             description="Plan the spec's runs into its store and execute those not finished yet.")
    run.add_argument("spec", help=SPEC_HELP)
    run.add_argument("--store", default=None, help="store file (default: OUT_DIR/study.sqlite from the spec)")
    run.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="local: worker processes on this machine; ray: tasks on a Ray cluster")
    run.add_argument("--workers", type=int, default=None,
                     help="local: worker processes (default: one per two cores); ray: runs at once "
                          "(default: the cluster's CPUs)")
    run.add_argument("--address", default=None, help="Ray cluster address, e.g. 10.0.0.1:6379 or auto "
                                                     "(default: start a Ray instance on this machine)")
    run.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    run.set_defaults(run=_run)

    status = actions.add_parser("status", help="done / running / failed / left, and the time left")
    status.add_argument("store", help=STORE_HELP)
    status.set_defaults(run=_status)

    retry = actions.add_parser("retry", help="run failed runs again",
                               description="Put failed runs back (all, or those whose key starts with KEY) and "
                                           "run exactly those, in this process.")
    retry.add_argument("store", help=STORE_HELP)
    retry.add_argument("keys", nargs="*", help="keys (or key prefixes) of the failed runs (default: all failed)")
    retry.add_argument("--no-run", dest="execute", action="store_false",
                       help="only mark them to run again; the next `study run` executes them")
    retry.set_defaults(run=_retry)

    report = commands.add_parser(
        "report", help="the paper's tables and plots from a study store",
        description="Table 1 (best robust vs best standard source per dataset and mode, selected on validation, "
                    "reported on test, spread over seeds), accuracy-vs-eps curves, per-architecture bars and "
                    "robust accuracy after transfer, as Markdown, CSV, PNG and one self-contained HTML page.")
    report.add_argument("store", help=STORE_HELP)
    report.add_argument("--out", required=True, help="folder for report.md, report.html, CSVs and PNGs")
    report.add_argument("--title", default=None, help="page title (default: the study's name)")
    report.set_defaults(run=_report)
