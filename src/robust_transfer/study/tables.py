"""The report's numbers: Table 1, accuracy-vs-eps curves, per-architecture bars and the paper's analyses (best
eps, resolution, other notions of robustness, source vs transfer accuracy), from finished transfer runs.

Pure computations over :class:`~robust_transfer.study.outcomes.TransferOutcome` records; writing files is
:mod:`robust_transfer.study.report`'s job. Every choice follows the paper: runs of one source and one
hyperparameter setting are pooled over seeds, and the best of several is *selected on validation and
reported on test*, so the test set never chooses what it scores.

Sources trained with Gaussian noise (``noise_sigma`` set) have eps 0 but are not standard: Table 1, the curves
and the bars compare adversarially robust sources with standard ones only, and `notions` adds the noise ones.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from ..data.detection import TASKS
from ..errors import RobustTransferError
from ..models.registry import size_order
from .outcomes import SourceOutcome, TransferOutcome

NO_RUNS = "no finished transfer runs in the store yet: run `robust-transfer study run SPEC` first"
TIE_TOLERANCE = 1e-9  # test means closer than this are float noise, not a difference


@dataclass(frozen=True)
class SourceResult:
    """One source model at one hyperparameter setting on one dataset and mode, pooled over seeds.

    ``test_std`` is the sample standard deviation over seeds (0 for one seed); ``robust_acc`` the mean
    robust accuracy after transfer over the seeds that measured it (None: none did); ``mask_ap`` likewise
    for instance segmentation's mask AP.
    """

    source: str
    arch: str
    norm: str | None
    eps: float
    setting: str
    metric: str
    val_mean: float
    test_mean: float
    test_std: float
    n_seeds: int
    robust_acc: float | None
    mask_ap: float | None = None
    noise_sigma: float | None = None

    @property
    def robust(self) -> bool:
        """Adversarially robust (eps > 0)."""
        return self.eps > 0

    @property
    def notion(self) -> str:
        """``adversarial``, ``noise`` (Gaussian-noise augmentation) or ``standard``."""
        return "noise" if self.noise_sigma is not None else "adversarial" if self.robust else "standard"


@dataclass(frozen=True)
class Table1Row:
    """The paper's Table 1 for one dataset and mode: the best robust against the best standard source.

    ``delta`` is robust minus standard test mean and ``winner`` is ``"robust"``, ``"standard"`` or
    ``"tie"``; both are None when a side has no runs.
    """

    dataset: str
    mode: str
    metric: str
    best_robust: SourceResult | None
    best_standard: SourceResult | None
    delta: float | None
    winner: str | None


@dataclass(frozen=True)
class ArchRow:
    """Table 1 restricted to one architecture (the paper's Figure 4 bars)."""

    dataset: str
    mode: str
    arch: str
    best_robust: SourceResult | None
    best_standard: SourceResult | None
    delta: float | None
    winner: str | None


class CurveKey(NamedTuple):
    """One accuracy-vs-eps curve: a dataset, a mode, an architecture and the robust sources' threat model.

    Curves are split by ``norm`` because L2 and Linf eps are on different scales; the standard
    sources (eps 0) of the architecture are the eps-0 point of every norm's curve. ``norm`` is None
    for a curve without robust sources, or whose robust sources' threat model is unknown.
    """

    dataset: str
    mode: str
    arch: str
    norm: str | None


class CurvePoint(NamedTuple):
    """The best group at one source eps (selected on validation): its test mean and std over seeds."""

    eps: float
    test_mean: float
    test_std: float


def mode_order(mode: str) -> tuple:
    """fixed, full, then partial:K by K (numerically: partial:10 after partial:2), then the dense tasks."""
    if mode.startswith("partial:") and mode[8:].isdigit():
        return (2, int(mode[8:]), mode)
    return ({"fixed": 0, "full": 1, "detection": 4, "instance-segmentation": 5}.get(mode, 3), 0, mode)


def is_dense(mode: str) -> bool:
    """Detection and instance segmentation: scored in box AP, reported in their own table."""
    return mode in TASKS


def _require(transfers: list[TransferOutcome]) -> None:
    if not transfers:
        raise RobustTransferError(NO_RUNS)


def _pool(runs: list[TransferOutcome]) -> SourceResult:
    runs = sorted(runs, key=lambda run: run.seed)  # a fixed order keeps float means reproducible
    first, tests = runs[0], [run.test_score for run in runs]
    robust = [run.robust_acc for run in runs if run.robust_acc is not None]
    masks = [run.mask_ap for run in runs if run.mask_ap is not None]
    return SourceResult(
        source=first.source, arch=first.arch, norm=first.norm if first.eps > 0 else None, eps=first.eps,
        setting=first.setting, metric=first.metric, val_mean=statistics.fmean(run.val_score for run in runs),
        test_mean=statistics.fmean(tests), test_std=statistics.stdev(tests) if len(tests) > 1 else 0.0,
        n_seeds=len(runs), robust_acc=statistics.fmean(robust) if robust else None,
        mask_ap=statistics.fmean(masks) if masks else None, noise_sigma=first.noise_sigma)


def pool_seeds(transfers: Iterable[TransferOutcome]) -> list[SourceResult]:
    """Pool runs that differ only in their seed: one result per (source, setting)."""
    groups: dict[tuple, list[TransferOutcome]] = defaultdict(list)
    for run in transfers:
        groups[(run.source, run.arch, run.norm, run.eps, run.noise_sigma, run.setting)].append(run)
    return [_pool(runs) for runs in groups.values()]


def _without_noise(transfers: Iterable[TransferOutcome]) -> list[TransferOutcome]:
    """Adversarially robust and standard sources only: what Table 1, the curves and the bars compare."""
    return [run for run in transfers if run.noise_sigma is None]


def select(results: Iterable[SourceResult]) -> SourceResult | None:
    """The result with the highest mean validation score; ties go to lower eps, then label, then setting."""
    return min(results, key=lambda r: (-r.val_mean, r.eps, r.source, r.setting), default=None)


def _compare(results: list[SourceResult]) -> tuple[SourceResult | None, SourceResult | None, float | None, str | None]:
    robust = select(r for r in results if r.robust)
    standard = select(r for r in results if not r.robust)
    if robust is None or standard is None:
        return robust, standard, None, None
    delta = robust.test_mean - standard.test_mean
    winner = "tie" if abs(delta) <= TIE_TOLERANCE else "robust" if delta > 0 else "standard"
    return robust, standard, delta, winner


def _by(transfers: Iterable[TransferOutcome], *fields: str) -> dict[tuple, list[TransferOutcome]]:
    groups: dict[tuple, list[TransferOutcome]] = defaultdict(list)
    for run in transfers:
        groups[tuple(getattr(run, field) for field in fields)].append(run)
    return groups


def table1(transfers: list[TransferOutcome]) -> list[Table1Row]:
    """The paper's Table 1: per dataset and mode, the best robust and the best standard source.

    "Best" is the (source, setting) group with the highest mean validation score over seeds; the row
    reports that group's test score. Rows are sorted by dataset, then mode.
    """
    _require(transfers)
    rows = []
    for (dataset, mode), runs in _by(_without_noise(transfers), "dataset", "mode").items():
        results = pool_seeds(runs)
        metric = "/".join(sorted({r.metric for r in results}))
        rows.append(Table1Row(dataset, mode, metric, *_compare(results)))
    return sorted(rows, key=lambda row: (row.dataset, mode_order(row.mode)))


def arch_bars(transfers: list[TransferOutcome]) -> list[ArchRow]:
    """Per dataset, mode and architecture: the best robust against the best standard source (Figure 4).

    Within a dataset and mode, architectures come family by family, smallest first (ResNet-18, ResNet-50,
    WRN-50-2, WRN-50-4: the paper's width study), as the registry declares them."""
    _require(transfers)
    rows = [ArchRow(dataset, mode, arch, *_compare(pool_seeds(runs)))
            for (dataset, mode, arch), runs in _by(_without_noise(transfers), "dataset", "mode", "arch").items()]
    return sorted(rows, key=lambda row: (row.dataset, mode_order(row.mode), size_order(row.arch)))


def _best_at_each_eps(results: list[SourceResult]) -> list[SourceResult]:
    by_eps: dict[float, list[SourceResult]] = defaultdict(list)
    for result in results:
        by_eps[result.eps].append(result)
    return [select(by_eps[eps]) for eps in sorted(by_eps)]


def best_per_eps(transfers: list[TransferOutcome]) -> dict[CurveKey, list[SourceResult]]:
    """Per :class:`CurveKey`, the best result at each source eps (selected on validation), by eps."""
    _require(transfers)
    curves = {}
    for (dataset, mode, arch), runs in _by(_without_noise(transfers), "dataset", "mode", "arch").items():
        results = pool_seeds(runs)
        standard = [r for r in results if not r.robust]
        norms = sorted({r.norm or "" for r in results if r.robust}) or [None]
        for norm in norms:  # "": robust sources of unknown threat model; None: no robust sources
            robust = [r for r in results if r.robust and (r.norm or "") == norm]
            curves[CurveKey(dataset, mode, arch, norm or None)] = _best_at_each_eps(standard + robust)
    return dict(sorted(curves.items(), key=lambda item: (item[0].dataset, mode_order(item[0].mode),
                                                         size_order(item[0].arch), item[0].norm or "")))


def eps_curves(transfers: list[TransferOutcome]) -> dict[CurveKey, list[CurvePoint]]:
    """Accuracy against source eps: per (dataset, mode, arch, norm), one point per eps, sorted by eps.

    Each point is the group selected on validation at that eps, with its test mean and std over seeds.
    With one architecture and one threat model there is one curve per (dataset, mode).
    """
    return {key: [CurvePoint(r.eps, r.test_mean, r.test_std) for r in results]
            for key, results in best_per_eps(transfers).items()}


def best_eps(curves: dict[CurveKey, list[SourceResult]]) -> dict[CurveKey, SourceResult]:
    """Per curve, the point selected on validation over every eps: the robustness level that transfers best
    to that target (the paper's Figure 2 argument: neither the most robust nor the standard source)."""
    return {key: select(results) for key, results in curves.items() if results}


@dataclass(frozen=True)
class NotionRow:
    """One dataset and mode: the best standard, adversarially robust and Gaussian-noise source (on validation)."""

    dataset: str
    mode: str
    metric: str
    standard: SourceResult | None
    adversarial: SourceResult | None
    noise: SourceResult | None

    @property
    def best(self) -> str | None:
        """The notion with the highest test mean among those present (None: fewer than two present)."""
        present = {name: result for name, result in (("standard", self.standard), ("adversarial", self.adversarial),
                                                       ("noise", self.noise)) if result is not None}
        if len(present) < 2:
            return None
        return max(present, key=lambda name: present[name].test_mean)


def notions(transfers: list[TransferOutcome]) -> list[NotionRow]:
    """Other notions of robustness: per dataset and mode, the best source of each notion (selected on
    validation, reported on test). Empty when no source was trained with Gaussian noise."""
    if not any(run.noise_sigma is not None for run in transfers):
        return []
    rows = []
    for (dataset, mode), runs in _by(transfers, "dataset", "mode").items():
        results = pool_seeds(runs)
        best = {notion: select(r for r in results if r.notion == notion)
                for notion in ("standard", "adversarial", "noise")}
        rows.append(NotionRow(dataset, mode, "/".join(sorted({r.metric for r in results})), **best))
    return sorted(rows, key=lambda row: (row.dataset, mode_order(row.mode)))


def targets_by_label(transfers: Iterable[TransferOutcome]) -> dict[str, tuple[str, int | None]]:
    """Each dataset label of the runs (``digits``, ``digits at 7 px``) as (target, resolution; None: native)."""
    return {run.dataset: (run.target or run.dataset, run.resolution) for run in transfers}


@dataclass(frozen=True)
class ResolutionRow:
    """Table 1's comparison for one target and mode at its native resolution and at a low one."""

    target: str
    mode: str
    resolution: int
    native: Table1Row
    low: Table1Row


def resolution_rows(transfers: list[TransferOutcome]) -> list[ResolutionRow]:
    """Per target, mode and low resolution: Table 1 at native resolution beside Table 1 at that resolution."""
    where = targets_by_label(transfers)
    if not any(resolution for _, resolution in where.values()):
        return []
    rows = table1(transfers)
    native = {(where[row.dataset][0], row.mode): row for row in rows if where[row.dataset][1] is None}
    paired = [ResolutionRow(target, row.mode, resolution, native[(target, row.mode)], row)
              for row in rows for target, resolution in [where[row.dataset]]
              if resolution is not None and (target, row.mode) in native]
    return sorted(paired, key=lambda row: (row.target, mode_order(row.mode), -row.resolution))


class AccuracyPoint(NamedTuple):
    """One source on one target and mode: its own clean accuracy against its best transfer score."""

    source: str
    notion: str
    eps: float
    source_acc: float
    transfer: SourceResult


def source_vs_transfer(sources: list[SourceOutcome],
                       transfers: list[TransferOutcome]) -> dict[tuple[str, str], list[AccuracyPoint]]:
    """Per (dataset, mode): each source whose own test accuracy is known, against its transfer test score at
    the setting selected on validation (the paper's Table 2 argument: source accuracy does not order transfer)."""
    accuracy = {s.source: s.clean_acc for s in sources if s.clean_acc is not None}
    points: dict[tuple[str, str], list[AccuracyPoint]] = {}
    for (dataset, mode, source), runs in sorted(_by(transfers, "dataset", "mode", "source").items(),
                                                key=lambda item: (item[0][0], mode_order(item[0][1]), item[0][2])):
        if source in accuracy:
            best = select(pool_seeds(runs))
            points.setdefault((dataset, mode), []).append(AccuracyPoint(source, best.notion, best.eps,
                                                                        accuracy[source], best))
    return points
