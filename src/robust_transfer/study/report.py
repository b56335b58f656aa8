"""The study report: Table 1, source models, per-architecture results, the paper's analyses, perceptual-alignment
grids and plots as Markdown, HTML, CSV and PNG.

The numbers come from :mod:`robust_transfer.study.tables`; this module lays them out. The page is
built once as a list of blocks and rendered twice, so ``report.md`` and ``report.html`` cannot
disagree. Plots draw on :class:`matplotlib.figure.Figure` directly (Agg, no pyplot global state).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..atomic import atomic_write
from ..errors import RobustTransferError
from ..visualize.grids import image_grid
from .outcomes import PictureOutcome, SourceOutcome, TransferOutcome
from .plots import PLOTS, draw_plots, png_of
from .tables import (
    NO_RUNS,
    SourceResult,
    Table1Row,
    arch_bars,
    best_eps,
    best_per_eps,
    is_dense,
    mode_order,
    notions,
    resolution_rows,
    source_vs_transfer,
    table1,
)

SIDES = ("robust", "standard")
SIDE_FIELDS = ("source", "arch", "norm", "eps", "setting", "val_mean", "test_mean", "test_std", "n_seeds",
               "robust_acc", "mask_ap")
CSV_SIDE_NAMES = {"val_mean": "val", "test_mean": "test", "n_seeds": "seeds"}  # flat column suffixes


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote; a plot is None when there was nothing to draw."""

    markdown: Path
    html: Path
    table1_csv: Path
    runs_csv: Path
    accuracy_vs_eps: Path | None
    architectures: Path | None
    robust_after_transfer: Path | None
    resolution: Path | None
    source_vs_transfer: Path | None
    pictures: tuple[Path, ...] = ()


# The page as blocks: ("h", level, text), ("p", text), ("table", header, rows), ("list", items), ("img", name, png).


def _pct(value: float | None) -> str:
    return "not measured" if value is None else f"{100 * value:.2f}%"


def _ap(value: float | None, std: float = 0.0) -> str:
    """AP as detection papers print it (x100, two decimals), ± the std over seeds when there are several."""
    if value is None:
        return "—"
    return f"{100 * value:.2f}" + (f" ± {100 * std:.2f}" if std else "")


def _score(result: SourceResult | None) -> str:
    if result is None:
        return "—"
    if result.metric.startswith("box AP"):  # detection papers print AP x100, without a percent sign
        return _ap(result.test_mean, result.test_std)
    if result.n_seeds > 1:
        return f"{100 * result.test_mean:.2f} ± {100 * result.test_std:.2f}% ({result.n_seeds} seeds)"
    return _pct(result.test_mean)


def _source(result: SourceResult | None, side: str) -> str:
    if result is None:
        return f"no {side} source"
    return f"{result.source} ({result.setting})" if result.setting else result.source


def format_eps(eps: float, norm: str | None) -> str:
    """``1`` for L2, ``4/255`` for the Linf eps that papers write over 255."""
    steps = eps * 255
    if norm == "linf" and 0 < eps < 1 and abs(steps - round(steps)) < 1e-6:
        return f"{round(steps)}/255"
    return f"{eps:g}"


def _eps(result: SourceResult | None) -> str:
    if result is None:
        return "—"
    eps = format_eps(result.eps, result.norm)
    return f"{eps} ({result.norm})" if result.norm else eps


def _delta(row) -> str:
    return "—" if row.delta is None else f"{100 * row.delta:+.2f} points"


def _winner(row) -> str:
    if row.winner is not None:
        return row.winner
    return "n/a: no " + ("robust" if row.best_robust is None else "standard") + " source"


def mode_title(mode: str) -> str:
    if mode.startswith("partial:"):
        return f"Partial fine-tuning ({mode}: first {mode[8:]} stages frozen)"
    return {"fixed": "Fixed-feature transfer", "full": "Full-network fine-tuning", "detection": "Object detection",
            "instance-segmentation": "Instance segmentation"}.get(mode, f"Transfer ({mode})")


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _verdict(mode: str, rows: list[Table1Row]) -> str:
    """One plain sentence per mode, saying who won where, as measured."""
    compared = [row for row in rows if row.winner]
    missing = [row.dataset for row in rows if not row.winner]
    if not compared:
        return f"{mode_title(mode)}: no dataset has both robust and standard runs, so nothing is compared."
    won = {w: [row.dataset for row in compared if row.winner == w] for w in ("robust", "standard", "tie")}
    parts = [f"the best {side} source transfers better on {', '.join(won[side])}" for side in SIDES if won[side]]
    parts += [f"they tie on {', '.join(won['tie'])}"] if won["tie"] else []
    parts += [f"not compared (one side has no runs): {', '.join(missing)}"] if missing else []
    return (f"{mode_title(mode)}: robust sources win on {len(won['robust'])} of "
            f"{_plural(len(compared), 'dataset')}: {'; '.join(parts)}.")


def _table1_blocks(rows: list[Table1Row], attacks: list[str]) -> list[tuple]:
    blocks: list[tuple] = [
        ("h", 2, "Table 1: best robust vs best standard source"),
        ("p", "Per dataset and mode, the source model and hyperparameters with the highest mean validation score "
              "among robust sources (eps > 0) and among standard ones (eps 0): selected on validation, reported "
              "on test. Scores are test means over seeds, ± the standard deviation over seeds when there are "
              "several; eps is the robust source's training eps that won.")]
    for mode in sorted({row.mode for row in rows}, key=mode_order):
        in_mode = [row for row in rows if row.mode == mode]
        robust_measured = any(side and side.robust_acc is not None
                              for row in in_mode for side in (row.best_robust, row.best_standard))
        header = ["dataset", "metric", "best robust source", "eps", "robust test", "best standard source",
                  "standard test", "robust − standard", "better"]
        under = f" under {', '.join(attacks)}" if attacks else ""
        header += [f"robust acc after transfer (robust / standard source){under}"] if robust_measured else []
        table = []
        for row in in_mode:
            cells = [row.dataset, row.metric, _source(row.best_robust, "robust"), _eps(row.best_robust),
                     _score(row.best_robust), _source(row.best_standard, "standard"), _score(row.best_standard),
                     _delta(row), _winner(row)]
            if robust_measured:
                cells.append(" / ".join(_pct(side.robust_acc) if side else "—"
                                        for side in (row.best_robust, row.best_standard)))
            table.append(cells)
        blocks += [("h", 3, mode_title(mode)), ("table", header, table), ("p", _verdict(mode, in_mode))]
    return blocks


def _dense_blocks(rows: list[Table1Row]) -> list[tuple]:
    """The blog's detection table: box AP (and mask AP) of the best standard and the best robust backbone."""
    blocks: list[tuple] = [
        ("h", 2, "Detection and instance segmentation: standard vs robust backbone"),
        ("p", "Faster R-CNN (detection) and Mask R-CNN (instance segmentation) with a feature pyramid over each "
              "source's stages. Per task and dataset, the source with the highest mean validation box AP among "
              "robust sources and among standard ones, reported on test: box AP over IoU 0.50:0.95 (COCO's, "
              "the paper's Box AP) and mask AP, x100.")]
    header = ["task", "dataset", "metric", "standard source", "standard box AP", "standard mask AP",
              "robust source", "eps", "robust box AP", "robust mask AP", "robust − standard (box AP)", "better"]
    table = []
    for row in sorted(rows, key=lambda row: (mode_order(row.mode), row.dataset)):
        standard, robust = row.best_standard, row.best_robust
        delta = "—" if row.delta is None else f"{100 * row.delta:+.2f}"
        cells = [mode_title(row.mode).lower(), row.dataset, row.metric]
        for side, result in (("standard", standard), ("robust", robust)):
            cells += [_source(result, side)] + ([_eps(result)] if side == "robust" else [])
            cells += [_ap(result.test_mean, result.test_std), _ap(result.mask_ap)] if result else ["—", "—"]
        table.append(cells + [delta, _winner(row)])
    compared = [row for row in rows if row.winner]
    verdict = (f"The robust backbone detects better in {sum(row.winner == 'robust' for row in compared)} of "
               f"{_plural(len(compared), 'comparison')} (task x dataset)." if compared else
               "No task has both robust and standard runs, so nothing is compared.")
    return blocks + [("table", header, table), ("p", verdict)]


def _sources_blocks(sources: list[SourceOutcome]) -> list[tuple]:
    blocks: list[tuple] = [("h", 2, "Source models")]
    if not sources:
        return blocks + [("p", "No source models are recorded in the store.")]
    header = ["source", "arch", "trained as", "norm", "clean acc", "robust acc", "robust acc under"]
    def trained(s: SourceOutcome) -> str:
        if s.noise_sigma is not None:
            return f"Gaussian noise (sigma {s.noise_sigma:g})"
        return "standard (eps 0)" if s.eps == 0 else f"robust (eps {format_eps(s.eps, s.norm)})"

    rows = [[s.source, s.arch, trained(s), s.norm or "—", _pct(s.clean_acc), _pct(s.robust_acc), s.threat or "—"]
            for s in sorted(sources, key=lambda s: (s.arch, s.norm or "", s.eps, s.source))]
    return blocks + [("p", "Each source's accuracy on its own test data, clean and under the study's attack."),
                     ("table", header, rows)]


def _arch_blocks(transfers: list[TransferOutcome]) -> list[tuple]:
    header = ["dataset", "mode", "arch", "best robust source", "eps", "robust test", "best standard source",
              "standard test", "robust − standard", "better"]
    rows = [[row.dataset, row.mode, row.arch, _source(row.best_robust, "robust"), _eps(row.best_robust),
             _score(row.best_robust), _source(row.best_standard, "standard"), _score(row.best_standard),
             _delta(row), _winner(row)] for row in arch_bars(transfers)]
    return [("h", 2, "Per architecture"),
            ("p", "Table 1 within each architecture (the paper's Figure 4), selected on validation the same way; "
                  "each family's networks smallest first (ResNet-18, ResNet-50, WRN-50-2, WRN-50-4 for the paper's "
                  "width study)."),
            ("table", header, rows)]


def _section(title: str, text: str, header: list[str], rows: list[list]) -> list[tuple]:
    """An analysis section: its heading, what it shows and measured, and its table."""
    return [("h", 2, title), ("p", text), ("table", header, rows)]


def _best_eps_blocks(transfers: list[TransferOutcome]) -> list[tuple]:
    """Per target, mode and architecture: the source eps selected on validation over all eps (the star of
    accuracy_vs_eps.png), beside the standard and the most robust source's scores."""
    curves = {key: results for key, results in best_per_eps(transfers).items() if len({r.eps for r in results}) > 1}
    if not curves:
        return []
    header = ["dataset", "mode", "arch", "best eps", "its test", "standard (eps 0) test", "largest eps",
              "largest eps test"]
    rows, interior = [], 0
    for key, best in best_eps(curves).items():
        results = curves[key]
        standard = next((r for r in results if r.eps == 0), None)
        largest = results[-1]
        interior += 0 < best.eps < largest.eps
        rows.append([key.dataset, key.mode, key.arch, _eps(best) if best.robust else "0 (standard)", _score(best),
                     _score(standard), _eps(largest), _score(largest)])
    return _section("Robustness level: the best source eps per target",
                    "The source eps whose transfer scores highest on validation among all eps, reported on test "
                    "(starred in accuracy_vs_eps.png). The paper finds the best eps is often neither 0 nor the "
                    f"largest tried; here it lies strictly between them in {interior} of "
                    f"{_plural(len(rows), 'curve')}.", header, rows)


def _resolution_blocks(transfers: list[TransferOutcome]) -> list[tuple]:
    rows = resolution_rows(transfers)
    if not rows:
        return []
    header = ["target", "mode", "resolution", "native: robust − standard", "native: better",
              "low resolution: robust − standard", "low resolution: better"]
    table = [[row.target, row.mode, f"{row.resolution} px", _delta(row.native), _winner(row.native), _delta(row.low),
              _winner(row.low)] for row in rows]
    grew = sum(row.native.delta is not None and row.low.delta is not None and row.low.delta > row.native.delta
               for row in rows)
    return _section("Input resolution",
                    "Every image of each target taken down to a low resolution and back up to its size before "
                    "transfer (the paper's 32 px experiment), against the same transfer at native resolution: the "
                    "best robust minus the best standard source, each selected on validation. The robust advantage "
                    f"is larger at low resolution in {grew} of {_plural(len(rows), 'comparison')}; resolution.png "
                    "shows the curves.", header, table)


def _notion_blocks(transfers: list[TransferOutcome]) -> list[tuple]:
    rows = notions(transfers)
    if not rows:
        return []

    def side(result: SourceResult | None) -> str:
        if result is None:
            return "—"
        level = f", sigma {result.noise_sigma:g}" if result.noise_sigma is not None else \
            (f", eps {_eps(result)}" if result.robust else "")
        return f"{_score(result)} ({result.source}{level})"

    header = ["dataset", "mode", "metric", "standard", "adversarially robust", "Gaussian noise", "best"]
    table = [[row.dataset, row.mode, row.metric, side(row.standard), side(row.adversarial), side(row.noise),
              row.best or "—"] for row in rows]
    counted = [row for row in rows if row.best]
    wins = {notion: sum(row.best == notion for row in counted) for notion in ("adversarial", "noise", "standard")}
    return _section("Other notions of robustness: Gaussian-noise training",
                    "Sources trained with Gaussian-noise augmentation (method noise, sigma in [0, 1] pixel units) "
                    "beside adversarially robust and standard ones: per dataset and mode, the best source of each "
                    f"kind, selected on validation and reported on test. Best: adversarial {wins['adversarial']}, "
                    f"noise {wins['noise']}, standard {wins['standard']} of {len(counted)}.", header, table)


def _accuracy_blocks(sources: list[SourceOutcome], transfers: list[TransferOutcome]) -> list[tuple]:
    points = {key: mine for key, mine in source_vs_transfer(sources, transfers).items() if len(mine) > 1}
    if not points:
        return []
    header = ["dataset", "mode", "most accurate source", "its transfer test",
              "best-transferring source (on validation)", "its transfer test", "same source"]
    table, same = [], 0
    for (dataset, mode), mine in points.items():
        accurate = max(mine, key=lambda p: p.source_acc)
        transferring = max(mine, key=lambda p: p.transfer.val_mean)  # chosen on validation, as Table 1's
        same += accurate.source == transferring.source
        table.append([dataset, mode, f"{accurate.source} ({_pct(accurate.source_acc)})", _score(accurate.transfer),
                      f"{transferring.source} ({_pct(transferring.source_acc)})", _score(transferring.transfer),
                      "yes" if accurate.source == transferring.source else "no"])
    return _section("Source accuracy against transfer accuracy",
                    "Does the more accurate source transfer better? The paper's Table 2 says not: robust models are "
                    "less accurate on ImageNet and transfer better. Here the most accurate source is also the best-"
                    f"transferring one in {same} of {_plural(len(table), 'case')} (source_vs_transfer.png plots "
                    "every source).", header, table)


def _picture_grids(pictures: list[PictureOutcome], sources: list[SourceOutcome]) -> list[tuple[str, str, bytes]]:
    """(file name, caption, PNG) per kind and dataset: the reference row on top, then one row per source,
    standard first, then by eps, then noise-trained."""
    order = {s.source: (s.noise_sigma is not None, s.eps, s.noise_sigma or 0.0, s.source) for s in sources}
    groups: dict[tuple[str, str], list[PictureOutcome]] = {}
    for picture in pictures:
        groups.setdefault((picture.kind, picture.dataset), []).append(picture)
    several = len({dataset for _, dataset in groups}) > 1
    grids = []
    for (kind, dataset), members in sorted(groups.items()):
        members.sort(key=lambda p: order.get(p.source, (True, 0.0, 0.0, p.source)))
        try:
            loaded = [load_file(p.file) for p in members]
        except OSError as error:
            raise RobustTransferError(f"cannot read the {kind} pictures ({error}): run `robust-transfer study run "
                                      "SPEC` again to redraw them") from None
        rows: dict[str, torch.Tensor] = {members[0].reference_name: loaded[0]["reference"]}
        shape = loaded[0]["row"].shape  # a source taking other images cannot share the first one's grid
        rows.update({p.source: t["row"] for p, t in zip(members, loaded, strict=True) if t["row"].shape == shape})
        name = f"{kind}-{dataset}.png" if several else f"{kind}.png"
        caption = {"inversion": f"representation inversion on {dataset}: each source's image whose penultimate "
                                "features match the top row's, found by PGD from noise (Figure 3)",
                   "synthesis": f"class synthesis on {dataset}: each source's targeted large-eps attack from the "
                                "top row's class-conditional seeds",
                   "saliency": f"input-gradient saliency on {dataset}"}[kind]
        grids.append((name, caption, png_of(image_grid(rows))))
    return grids


def _picture_blocks(grids: list[tuple[str, str, bytes]]) -> list[tuple]:
    if not grids:
        return []
    return [("h", 2, "Perceptual alignment"),
            ("p", "Robust models' representations look like the images they come from (the blog's Figure 3); "
                  "standard models' do not. One row per source."),
            ("list", [f"{name}: {caption}" for name, caption, _ in grids]),
            *[("img", name, data) for name, _, data in grids]]


def _plot_blocks(plots: dict[str, bytes | str]) -> list[tuple]:
    """A list saying what each plot shows (or why it was not drawn), then the drawn ones."""
    items, images = [], []
    for name, (filename, caption) in PLOTS.items():
        drawn = plots[name]
        if isinstance(drawn, bytes):
            items.append(f"{filename}: {caption}")
            images.append(("img", filename, drawn))
        else:
            items.append(f"{filename}: not drawn ({drawn})")
    return [("h", 2, "Plots"), ("list", items), *images]


def _summary(transfers: list[TransferOutcome], sources: list[SourceOutcome]) -> str:
    count = lambda field: len({getattr(run, field) for run in transfers})
    labels = {run.source for run in transfers} | {source.source for source in sources}
    return (f"Runs: {len(transfers)} finished transfer runs over {_plural(count('dataset'), 'dataset')}, "
            f"{_plural(count('mode'), 'mode')}, {_plural(len(labels), 'source model')} and "
            f"{_plural(count('seed'), 'seed')}; runs.csv lists every one.")


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *body in blocks:
        if kind == "h":
            out.append("#" * body[0] + " " + body[1])
        elif kind == "p":
            out.append(body[0])
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in body[0]))
        elif kind == "img":
            out.append(f"![{body[0]}]({body[0]})")
        else:
            header, rows = body
            lines = ["| " + " | ".join(map(_markdown_cell, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(_markdown_cell(str(cell)) for cell in row) + " |" for row in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


STYLE = ("body{font-family:sans-serif;max-width:80em;margin:2em auto;padding:0 1em;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:.3em .6em;"
         "text-align:left}th{background:#eee}img{max-width:100%;display:block;margin:1em 0}")


def render_html(blocks: list[tuple], title: str) -> str:
    """One self-contained page: inline style, images as data URIs, every text escaped."""
    e = html.escape
    out = []
    for kind, *body in blocks:
        if kind == "h":
            out.append(f"<h{body[0]}>{e(body[1])}</h{body[0]}>")
        elif kind == "p":
            out.append(f"<p>{e(body[0])}</p>")
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in body[0]) + "</ul>")
        elif kind == "img":
            data = base64.b64encode(body[1]).decode("ascii")
            out.append(f'<figure><img alt="{e(body[0])}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{e(body[0])}</figcaption></figure>")
        else:
            header, rows = body
            head = "".join(f"<th>{e(cell)}</th>" for cell in header)
            lines = "".join("<tr>" + "".join(f"<td>{e(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{lines}</tbody></table>")
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{e(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n" + "\n".join(out) + "\n</body>\n</html>\n")


def _csv_text(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if cell is None else cell for cell in row] for row in rows])
    return buffer.getvalue()


def table1_csv(rows: list[Table1Row]) -> str:
    """One flat row per Table 1 row: ``robust_test``, ``standard_val``, ... (empty where a side is missing)."""
    header = ["dataset", "mode", "metric"]
    header += [f"{side}_{CSV_SIDE_NAMES.get(name, name)}" for side in SIDES for name in SIDE_FIELDS]
    header += ["delta", "winner"]
    flat = []
    for row in rows:
        cells = [row.dataset, row.mode, row.metric]
        for side in (row.best_robust, row.best_standard):
            cells += [getattr(side, name) if side else None for name in SIDE_FIELDS]
        flat.append(cells + [row.delta, row.winner])
    return _csv_text(header, flat)


def runs_csv(transfers: list[TransferOutcome]) -> str:
    """Every transfer run with all its fields, in a stable order."""
    names = [field.name for field in fields(TransferOutcome)]
    ordered = sorted(transfers, key=lambda r: (r.dataset, mode_order(r.mode), r.source, r.setting, r.seed, r.key))
    return _csv_text(names, [[getattr(run, name) for name in names] for run in ordered])


def _write(path: Path, data: bytes | str) -> Path:
    data = data.encode("utf-8") if isinstance(data, str) else data
    atomic_write(path, lambda handle: handle.write(data))
    path.chmod(0o644)  # the temporary file was private; a report is meant to be read and shared
    return path


def write_report(transfers: list[TransferOutcome], sources: list[SourceOutcome], out_dir: str | os.PathLike,
                 title: str = "Robust transfer study", pictures: list[PictureOutcome] = ()) -> ReportFiles:
    """Write ``report.md``, ``report.html``, ``table1.csv``, ``runs.csv``, the PNG plots and the picture grids
    (one per kind of ``pictures``) into ``out_dir``.

    A plot with nothing to draw is not written (and a stale copy from an earlier report is removed);
    the Markdown and HTML say why. Raises :class:`RobustTransferError` when there are no transfer runs.
    """
    if not transfers:
        raise RobustTransferError(NO_RUNS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = table1(transfers)
    plots = draw_plots(transfers, rows, sources)
    grids = _picture_grids(list(pictures), sources)
    written = {}
    for name, (filename, _) in PLOTS.items():
        if isinstance(plots[name], bytes):
            written[name] = _write(out / filename, plots[name])
        else:
            (out / filename).unlink(missing_ok=True)
            written[name] = None
    attacks = sorted({run.robust_threat for run in transfers if run.robust_threat})  # which attack made each number
    classified = [row for row in rows if not is_dense(row.mode)]
    dense = [row for row in rows if is_dense(row.mode)]
    blocks = [("h", 1, title), ("p", _summary(transfers, sources)),
              *(_table1_blocks(classified, attacks) if classified else []), *(_dense_blocks(dense) if dense else []),
              *_sources_blocks(sources), *_arch_blocks(transfers), *_best_eps_blocks(transfers),
              *_resolution_blocks(transfers), *_notion_blocks(transfers), *_accuracy_blocks(sources, transfers),
              *_picture_blocks(grids), *_plot_blocks(plots)]
    return ReportFiles(
        markdown=_write(out / "report.md", render_markdown(blocks)),
        html=_write(out / "report.html", render_html(blocks, title)),
        table1_csv=_write(out / "table1.csv", table1_csv(rows)),
        runs_csv=_write(out / "runs.csv", runs_csv(transfers)), **written,
        pictures=tuple(_write(out / name, data) for name, _, data in grids))
