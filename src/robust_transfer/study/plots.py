"""The report's plots as PNG bytes: accuracy against source eps (best eps marked), per-architecture bars (families
smallest first), robustness after transfer, native against low resolution, source against transfer accuracy.

Drawn on :class:`matplotlib.figure.Figure` objects, which render with Agg and touch no pyplot global
state, so reports can be written from worker threads and headless machines alike.
"""

from __future__ import annotations

import io
import math

from matplotlib.figure import Figure

from ..models.registry import size_order
from .outcomes import SourceOutcome, TransferOutcome
from .tables import (
    CurveKey,
    SourceResult,
    Table1Row,
    arch_bars,
    best_eps,
    best_per_eps,
    mode_order,
    source_vs_transfer,
    targets_by_label,
)

# name (a ReportFiles field) -> (file name, what it shows)
PLOTS = {
    "accuracy_vs_eps": ("accuracy_vs_eps.png",
                        "test score against the source's training eps, one panel per dataset, one line per mode; "
                        "each point is the setting selected on validation at that eps, error bars the std over "
                        "seeds; the star marks the eps selected on validation over all eps (the best eps)"),
    "architectures": ("architectures.png",
                      "best robust against best standard source per architecture and mode, one panel per dataset "
                      "(the paper's Figure 4); each family's networks smallest first (ResNet-18, ResNet-50, "
                      "WRN-50-2, WRN-50-4: the paper's width study)"),
    "robust_after_transfer": ("robust_after_transfer.png",
                              "robust accuracy after transfer against the source's training eps"),
    "resolution": ("resolution.png",
                   "test score against source eps at the target's native resolution (solid) and with its images "
                   "taken down to a low resolution and back (dashed), one panel per target"),
    "source_vs_transfer": ("source_vs_transfer.png",
                           "each source's own test accuracy against its transfer test score (setting selected on "
                           "validation), one panel per dataset, one marker per mode (the paper's Table 2 argument)"),
}
NOTION_COLORS = {"standard": "tab:blue", "adversarial": "tab:red", "noise": "tab:green"}
MODE_MARKERS = "osD^v<>"
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


def png_of(figure: Figure) -> bytes:
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


def _curve_figure(curves: dict[CurveKey, list[SourceResult]], value, ylabel,
                  best: dict[CurveKey, SourceResult] | None = None) -> Figure:
    """One panel per dataset, one line per curve; ``value(result)`` is (mean, std) or None (no point); a star
    marks each curve's ``best`` point."""
    datasets = sorted({key.dataset for key in curves})
    figure, axes = _panels(datasets)
    keys = list(curves)
    marked: set[str] = set()
    for key, results in curves.items():
        points = [(r.eps, value(r)) for r in results if value(r) is not None]
        if points:
            eps, (means, stds) = [p[0] for p in points], zip(*(p[1] for p in points), strict=True)
            errors = [100 * s for s in stds] if any(stds) else None
            line = axes[key.dataset].errorbar(eps, [100 * m for m in means], yerr=errors, marker="o", capsize=3,
                                              label=_label(key, keys))
            chosen = (best or {}).get(key)
            if chosen is not None and value(chosen) is not None and len(points) > 1:
                starred = key.dataset in marked  # one legend entry per panel says what a star is
                marked.add(key.dataset)
                axes[key.dataset].plot([chosen.eps], [100 * value(chosen)[0]], marker="*", markersize=16,
                                       color=line.lines[0].get_color(), markeredgecolor="black", linestyle="none",
                                       label=None if starred else "best eps (on validation)")
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
        for x, (before, after) in enumerate(zip(mine, mine[1:], strict=False)):  # a line between families / modes
            if (before.mode, size_order(before.arch)[0]) != (after.mode, size_order(after.arch)[0]):
                axis.axvline(x + 0.5, color="gray", linestyle=":", linewidth=1)
        axis.set_xticks(range(len(mine)), [f"{row.arch}\n{row.mode}" for row in mine], fontsize="small")
        axis.set_ylabel(f"test {metrics.get(dataset, 'score')} (%)")
        _legend(axis)
    return figure


def _resolution_figure(transfers: list[TransferOutcome], curves: dict[CurveKey, list[SourceResult]],
                       metrics: dict[str, str]) -> Figure | None:
    """Per target, each mode's curve at native resolution (solid) and at each low resolution (dashed)."""
    where = targets_by_label(transfers)
    targets = sorted({target for target, resolution in where.values() if resolution is not None
                      and (target, None) in set(where.values())})
    if not targets:
        return None
    figure, axes = _panels(targets)
    colors: dict[tuple, str] = {}  # one colour per curve at every resolution, solid native, dashed low
    keys = list(curves)
    for key, results in curves.items():
        target, resolution = where[key.dataset]
        if target not in axes:
            continue
        color = colors.setdefault((key.mode, key.arch, key.norm), f"C{len(colors) % 10}")
        axes[target].errorbar([r.eps for r in results], [100 * r.test_mean for r in results], marker="o",
                              capsize=3, color=color, linestyle="-" if resolution is None else "--",
                              label=f"{_label(key, keys)}, " + ("native" if resolution is None else f"{resolution} px"))
    for target, axis in axes.items():
        _eps_axis(axis, {r.eps for key, results in curves.items() if where[key.dataset][0] == target
                         for r in results})
        axis.set_ylabel(f"test {metrics.get(target, 'score')} (%)")
        _legend(axis)
    return figure


def _accuracy_figure(sources: list[SourceOutcome], transfers: list[TransferOutcome],
                     metrics: dict[str, str]) -> Figure | None:
    """Per dataset, each source's own accuracy (x) against its transfer score (y), coloured by notion."""
    points = source_vs_transfer(sources, transfers)
    if not points:
        return None
    datasets = sorted({dataset for dataset, _ in points})
    figure, axes = _panels(datasets)
    modes = sorted({mode for _, mode in points}, key=mode_order)
    for (dataset, mode), mine in points.items():
        axis = axes[dataset]
        for point in mine:
            axis.scatter(100 * point.source_acc, 100 * point.transfer.test_mean, color=NOTION_COLORS[point.notion],
                         marker=MODE_MARKERS[modes.index(mode) % len(MODE_MARKERS)], s=40, edgecolor="black",
                         linewidth=0.5)
            axis.annotate(point.source, (100 * point.source_acc, 100 * point.transfer.test_mean), fontsize="x-small",
                          xytext=(3, 3), textcoords="offset points")
    for dataset, axis in axes.items():
        for notion, color in NOTION_COLORS.items():  # a legend of what colour and marker mean
            if any(p.notion == notion for (d, _), mine in points.items() if d == dataset for p in mine):
                axis.scatter([], [], color=color, label=notion)
        for index, mode in enumerate(modes):
            if (dataset, mode) in points:
                axis.scatter([], [], color="white", edgecolor="black", label=mode,
                             marker=MODE_MARKERS[index % len(MODE_MARKERS)])
        axis.set_xlabel("source's own test accuracy (%)")
        axis.set_ylabel(f"transfer test {metrics.get(dataset, 'score')} (%)")
        _legend(axis)
    return figure


def draw_plots(transfers: list[TransferOutcome], rows: list[Table1Row],
               sources: list[SourceOutcome] = ()) -> dict[str, bytes | str]:
    """Each of :data:`PLOTS` as PNG bytes, or as the reason it was not drawn."""
    metrics = {row.dataset: row.metric for row in rows}
    curves = best_per_eps(transfers)
    accuracy = _curve_figure(curves, lambda r: (r.test_mean, r.test_std), lambda d: f"test {metrics[d]} (%)",
                             best=best_eps(curves))
    plots: dict[str, bytes | str] = {"accuracy_vs_eps": png_of(accuracy),
                                     "architectures": png_of(_arch_figure(transfers, metrics))}
    if any(r.robust_acc is not None for results in curves.values() for r in results):
        robust = _curve_figure(curves, lambda r: None if r.robust_acc is None else (r.robust_acc, 0.0),
                               lambda d: "robust accuracy after transfer (%)")
        plots["robust_after_transfer"] = png_of(robust)
    else:
        plots["robust_after_transfer"] = "no run measured robust accuracy after transfer"
    resolution = _resolution_figure(transfers, curves, metrics)
    plots["resolution"] = png_of(resolution) if resolution else "no target ran at a low resolution (resolution = R)"
    scatter = _accuracy_figure(list(sources), transfers, metrics)
    plots["source_vs_transfer"] = png_of(scatter) if scatter else "no source's own test accuracy is recorded"
    return plots
