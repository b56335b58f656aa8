"""The report's plots as PNG bytes: accuracy against source eps, per-architecture bars, robustness after transfer.

Drawn on :class:`matplotlib.figure.Figure` objects, which render with Agg and touch no pyplot global
state, so reports can be written from worker threads and headless machines alike.
"""

from __future__ import annotations

import io
import math

from matplotlib.figure import Figure

from .outcomes import TransferOutcome
from .tables import CurveKey, SourceResult, Table1Row, arch_bars, best_per_eps

# name (a ReportFiles field) -> (file name, what it shows)
PLOTS = {
    "accuracy_vs_eps": ("accuracy_vs_eps.png",
                        "test score against the source's training eps, one panel per dataset, one line per mode; "
                        "each point is the setting selected on validation at that eps, error bars the std over seeds"),
    "architectures": ("architectures.png",
                      "best robust against best standard source per architecture and mode, one panel per dataset "
                      "(the paper's Figure 4)"),
    "robust_after_transfer": ("robust_after_transfer.png",
                              "robust accuracy after transfer against the source's training eps"),
}
PANELS_PER_ROW = 4


def _panels(datasets: list[str], width: float = 4.2, height: float = 3.4) -> tuple[Figure, dict]:
    columns = min(len(datasets), PANELS_PER_ROW)
    rows = math.ceil(len(datasets) / columns)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for unused in axes[len(datasets):]:
        unused.set_visible(False)
    for axis, dataset in zip(axes, datasets, strict=False):
        axis.set_title(dataset)
        axis.grid(alpha=0.3)
    return figure, dict(zip(datasets, axes, strict=False))


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # No Software/date metadata: the same numbers give the same bytes.
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _label(key: CurveKey, keys: list[CurveKey]) -> str:
    """The mode, plus arch and norm only where the figure has several of them."""
    parts = [key.mode]
    parts += [key.arch] if len({k.arch for k in keys}) > 1 else []
    parts += [key.norm or "standard only"] if len({k.norm for k in keys}) > 1 else []
    return " ".join(parts)


def _eps_axis(axis, eps: set[float]) -> None:
    positive = sorted(e for e in eps if e > 0)
    # eps grids span decades (0.01 .. 5): a log scale beyond the smallest eps keeps them apart.
    if len(positive) > 1 and positive[-1] / positive[0] > 50:
        axis.set_xscale("symlog", linthresh=positive[0])
    axis.set_xlabel("source eps (0 = standard)")


def _legend(axis) -> None:
    if axis.get_legend_handles_labels()[0]:  # an empty legend only warns
        axis.legend(fontsize="small")


def _curve_figure(curves: dict[CurveKey, list[SourceResult]], value, ylabel) -> Figure:
    """One panel per dataset, one line per curve; ``value(result)`` is (mean, std) or None (no point)."""
    datasets = sorted({key.dataset for key in curves})
    figure, axes = _panels(datasets)
    keys = list(curves)
    for key, results in curves.items():
        points = [(r.eps, value(r)) for r in results if value(r) is not None]
        if points:
            eps, (means, stds) = [p[0] for p in points], zip(*(p[1] for p in points), strict=True)
            errors = [100 * s for s in stds] if any(stds) else None
            axes[key.dataset].errorbar(eps, [100 * m for m in means], yerr=errors, marker="o", capsize=3,
                                       label=_label(key, keys))
    for dataset, axis in axes.items():
        _eps_axis(axis, {key_eps for key, results in curves.items() if key.dataset == dataset
                         for key_eps in (r.eps for r in results)})
        axis.set_ylabel(ylabel(dataset))
        _legend(axis)
    return figure


def _arch_figure(transfers: list[TransferOutcome], metrics: dict[str, str]) -> Figure:
    rows = arch_bars(transfers)
    datasets = sorted({row.dataset for row in rows})
    figure, axes = _panels(datasets, width=max(4.2, 1.2 * max(
        sum(row.dataset == d for row in rows) for d in datasets)))
    for dataset, axis in axes.items():
        mine = [row for row in rows if row.dataset == dataset]
        for offset, side, color in ((-0.2, "best_robust", "tab:red"), (0.2, "best_standard", "tab:blue")):
            bars = [(x + offset, getattr(row, side)) for x, row in enumerate(mine) if getattr(row, side)]
            if bars:
                axis.bar([b[0] for b in bars], [100 * b[1].test_mean for b in bars], width=0.4, color=color,
                         yerr=[100 * b[1].test_std for b in bars], capsize=3, label=side.removeprefix("best_"))
        axis.set_xticks(range(len(mine)), [f"{row.arch}\n{row.mode}" for row in mine], fontsize="small")
        axis.set_ylabel(f"test {metrics.get(dataset, 'score')} (%)")
        _legend(axis)
    return figure


def draw_plots(transfers: list[TransferOutcome], rows: list[Table1Row]) -> dict[str, bytes | str]:
    """Each of :data:`PLOTS` as PNG bytes, or as the reason it was not drawn."""
    metrics = {row.dataset: row.metric for row in rows}
    curves = best_per_eps(transfers)
    accuracy = _curve_figure(curves, lambda r: (r.test_mean, r.test_std), lambda d: f"test {metrics[d]} (%)")
    plots: dict[str, bytes | str] = {"accuracy_vs_eps": _png(accuracy),
                                     "architectures": _png(_arch_figure(transfers, metrics))}
    if any(r.robust_acc is not None for results in curves.values() for r in results):
        robust = _curve_figure(curves, lambda r: None if r.robust_acc is None else (r.robust_acc, 0.0),
                               lambda d: "robust accuracy after transfer (%)")
        plots["robust_after_transfer"] = _png(robust)
    else:
        plots["robust_after_transfer"] = "no run measured robust accuracy after transfer"
    return plots
