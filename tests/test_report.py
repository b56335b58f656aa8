"""The study report: selection on validation, spread over seeds, who wins, and the files it writes."""

from __future__ import annotations

import csv
import dataclasses
import statistics

import pytest

from robust_transfer.errors import RobustTransferError
from robust_transfer.study.outcomes import SourceOutcome, TransferOutcome
from robust_transfer.study.report import format_eps, write_report
from robust_transfer.study.tables import CurveKey, arch_bars, eps_curves, select, table1

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# (dataset, mode, eps, setting) -> (mean val, test score per seed). Seeds 0 and 1 have val +-0.01 around the mean.
GRID = {
    # cifar10 fixed: robust wins. The best test score of all (eps 1, lr=0.1) has the worst val: a trap.
    ("cifar10", "fixed", 0.0, "lr=0.01"): (0.85, (0.80, 0.82)),
    ("cifar10", "fixed", 0.0, "lr=0.1"): (0.83, (0.84, 0.84)),
    ("cifar10", "fixed", 0.5, "lr=0.01"): (0.90, (0.88, 0.86)),
    ("cifar10", "fixed", 0.5, "lr=0.1"): (0.80, (0.80, 0.80)),
    ("cifar10", "fixed", 1.0, "lr=0.01"): (0.75, (0.85, 0.85)),
    ("cifar10", "fixed", 1.0, "lr=0.1"): (0.70, (0.95, 0.97)),
    # cifar10 full: standard wins.
    ("cifar10", "full", 0.0, "lr=0.01"): (0.95, (0.93, 0.93)),
    ("cifar10", "full", 0.0, "lr=0.1"): (0.90, (0.89, 0.89)),
    ("cifar10", "full", 0.5, "lr=0.01"): (0.94, (0.91, 0.90)),
    ("cifar10", "full", 0.5, "lr=0.1"): (0.92, (0.92, 0.92)),
    ("cifar10", "full", 1.0, "lr=0.01"): (0.93, (0.90, 0.90)),
    ("cifar10", "full", 1.0, "lr=0.1"): (0.91, (0.90, 0.90)),
    # pets fixed: no standard source ran.
    ("pets", "fixed", 0.5, "lr=0.01"): (0.60, (0.58, 0.60)),
    ("pets", "fixed", 1.0, "lr=0.01"): (0.62, (0.61, 0.61)),
    # pets full: robust wins.
    ("pets", "full", 0.0, "lr=0.01"): (0.70, (0.68, 0.70)),
    ("pets", "full", 1.0, "lr=0.01"): (0.72, (0.74, 0.76)),
}


def outcome(dataset, mode, eps, setting, seed, val, test, arch="resnet18", robust_acc=None) -> TransferOutcome:
    label = f"{arch}-eps{eps:g}"
    return TransferOutcome(
        key=f"{label}/{dataset}/{mode}/{setting}/{seed}", source=label, arch=arch, norm="l2" if eps else None,
        eps=eps, dataset=dataset, mode=mode, setting=setting, seed=seed, val_score=val, test_score=test,
        metric="top1", robust_acc=robust_acc, robust_threat="l2(eps=0.5)" if robust_acc is not None else None,
        seconds=1.5)


def grid_runs(arch: str = "resnet18", robust: bool = False) -> list[TransferOutcome]:
    runs = []
    for (dataset, mode, eps, setting), (val, tests) in GRID.items():
        for seed, test in enumerate(tests):
            acc = (0.1 + eps / 4 + seed / 100) if robust else None
            runs.append(outcome(dataset, mode, eps, setting, seed, val + (0.01 if seed == 0 else -0.01), test,
                                arch=arch, robust_acc=acc))
    return runs


SOURCES = [SourceOutcome(key=f"k{eps}", source=f"resnet18-eps{eps:g}", arch="resnet18", norm="l2" if eps else None,
                         eps=eps, clean_acc=0.9 - eps / 10, robust_acc=0.1 + eps / 2, threat="l2(eps=0.5)",
                         seconds=10.0) for eps in (0.0, 0.5, 1.0)]


def row_of(rows, dataset, mode):
    (row,) = [row for row in rows if (row.dataset, row.mode) == (dataset, mode)]
    return row


def test_table1_selects_on_validation_and_reports_test_with_the_spread_over_seeds():
    rows = table1(grid_runs())
    assert [(row.dataset, row.mode) for row in rows] == [
        ("cifar10", "fixed"), ("cifar10", "full"), ("pets", "fixed"), ("pets", "full")]
    row = row_of(rows, "cifar10", "fixed")
    robust, standard = row.best_robust, row.best_standard
    # The eps-1 lr=0.1 group has the best test score (0.96) but the worst val: it must not be picked.
    assert (robust.eps, robust.setting) == (0.5, "lr=0.01")
    assert robust.val_mean == pytest.approx(0.90)
    assert robust.test_mean == pytest.approx(0.87)
    assert robust.test_std == pytest.approx(statistics.stdev([0.88, 0.86]))
    assert robust.n_seeds == 2 and robust.robust_acc is None
    assert (standard.eps, standard.setting, standard.test_mean) == (0.0, "lr=0.01", pytest.approx(0.81))
    assert row.delta == pytest.approx(0.06) and row.winner == "robust"


def test_table1_says_when_standard_wins_and_when_a_side_is_missing():
    rows = table1(grid_runs())
    full = row_of(rows, "cifar10", "full")
    assert full.winner == "standard" and full.delta == pytest.approx(0.905 - 0.93)
    assert full.best_standard.test_std == 0.0  # both seeds scored the same
    pets = row_of(rows, "pets", "fixed")
    assert pets.best_standard is None and pets.delta is None and pets.winner is None
    assert pets.best_robust.eps == 1.0


def test_one_seed_has_zero_std_and_ties_go_to_the_lower_eps():
    runs = [outcome("d", "fixed", eps, "", 0, 0.5, test) for eps, test in ((1.0, 0.7), (0.5, 0.6), (0.0, 0.6))]
    (row,) = table1(runs)
    assert row.best_robust.eps == 0.5 and row.best_robust.test_std == 0.0 and row.best_robust.n_seeds == 1
    assert row.winner == "tie" and row.delta == 0.0
    assert select([]) is None


def test_linf_eps_is_written_over_255():
    assert format_eps(4 / 255, "linf") == "4/255" and format_eps(1.0, "l2") == "1" and format_eps(0.0, None) == "0"


def test_eps_curves_pick_the_validated_setting_at_each_eps():
    curves = eps_curves(grid_runs())
    points = curves[CurveKey("cifar10", "fixed", "resnet18", "l2")]
    assert [p.eps for p in points] == [0.0, 0.5, 1.0]
    assert [p.test_mean for p in points] == pytest.approx([0.81, 0.87, 0.85])  # eps 1: lr=0.01 (val 0.75)
    assert points[1].test_std == pytest.approx(statistics.stdev([0.88, 0.86]))
    assert CurveKey("pets", "fixed", "resnet18", "l2") in curves and len(curves) == 4


def test_several_architectures_get_their_own_curves_and_bars():
    vgg = [dataclasses.replace(run, arch="vgg16", source=run.source.replace("resnet18", "vgg16"),
                               test_score=run.test_score - 0.1 * (run.eps == 0))
           for run in grid_runs()]
    runs = grid_runs() + vgg
    assert {key.arch for key in eps_curves(runs)} == {"resnet18", "vgg16"} and len(eps_curves(runs)) == 8
    bars = arch_bars(runs)
    assert [(b.dataset, b.mode, b.arch) for b in bars][:2] == [("cifar10", "fixed", "resnet18"),
                                                               ("cifar10", "fixed", "vgg16")]
    vgg_full = [b for b in bars if (b.dataset, b.mode, b.arch) == ("cifar10", "full", "vgg16")][0]
    assert vgg_full.winner == "robust" and vgg_full.best_standard.test_mean == pytest.approx(0.83)
    # Table 1 picks across architectures: the best val among robust sources of either arch.
    assert row_of(table1(runs), "cifar10", "full").best_robust.arch in {"resnet18", "vgg16"}


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    runs = grid_runs(robust=True)
    out = tmp_path_factory.mktemp("report") / "nested" / "out"
    return runs, out, write_report(runs, SOURCES, out, title="Test <study> & co")


def test_report_files_exist_and_plots_are_pngs(report):
    _, out, files = report
    assert files.markdown == out / "report.md" and files.html.exists()
    for plot in (files.accuracy_vs_eps, files.architectures, files.robust_after_transfer):
        assert plot is not None and plot.read_bytes().startswith(PNG_MAGIC)


def test_markdown_prints_what_was_measured(report):
    runs, _, files = report
    text = files.markdown.read_text(encoding="utf-8")
    assert text.startswith("# Test <study> & co\n")
    assert f"Runs: {len(runs)} finished transfer runs" in text
    assert "| cifar10 | top1 | resnet18-eps0.5 (lr=0.01) | 0.5 (l2) | 87.00 ± 1.41% (2 seeds) |" in text
    assert ("Full-network fine-tuning: robust sources win on 1 of 2 datasets: the best robust source transfers "
            "better on pets; the best standard source transfers better on cifar10.") in text
    assert ("Fixed-feature transfer: robust sources win on 1 of 1 dataset: the best robust source transfers "
            "better on cifar10; not compared (one side has no runs): pets.") in text
    assert "| -2.50 points | standard |" in text and "no standard source" in text
    assert "robust acc after transfer (robust / standard source) under l2(eps=0.5)" in text  # names the attack
    assert "| resnet18-eps0.5 | resnet18 | robust (eps 0.5) | l2 | 85.00% | 35.00% | l2(eps=0.5) |" in text
    assert "![accuracy_vs_eps.png](accuracy_vs_eps.png)" in text


def test_csv_rows_match_the_runs(report):
    runs, out, _ = report
    rows = read_csv(out / "runs.csv")
    assert len(rows) == len(runs)
    by_key = {run.key: run for run in runs}
    for row in rows:
        run = by_key[row["key"]]
        assert float(row["test_score"]) == run.test_score and float(row["val_score"]) == run.val_score
        assert int(row["seed"]) == run.seed and float(row["eps"]) == run.eps and row["mode"] == run.mode
    table = read_csv(out / "table1.csv")
    assert [(r["dataset"], r["mode"], r["winner"]) for r in table] == [
        ("cifar10", "fixed", "robust"), ("cifar10", "full", "standard"), ("pets", "fixed", ""),
        ("pets", "full", "robust")]
    assert float(table[0]["robust_test"]) == pytest.approx(0.87) and float(table[0]["standard_test"]) == 0.81
    assert float(table[0]["robust_test_std"]) == pytest.approx(statistics.stdev([0.88, 0.86]))
    assert table[0]["robust_seeds"] == "2" and table[0]["robust_setting"] == "lr=0.01"
    assert table[2]["standard_test"] == "" and table[2]["delta"] == ""


def test_html_is_one_self_contained_escaped_page(report):
    _, _, files = report
    page = files.html.read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 4  # three plots and the source-vs-transfer scatter
    assert 'src="http' not in page and "<script" not in page and "<link" not in page
    assert "<title>Test &lt;study&gt; &amp; co</title>" in page and "<study>" not in page
    assert "<td>87.00 ± 1.41% (2 seeds)</td>" in page


def test_robust_plot_is_skipped_without_measurements_and_a_stale_one_removed(tmp_path):
    assert write_report(grid_runs(robust=True), SOURCES, tmp_path).robust_after_transfer is not None
    files = write_report(grid_runs(), SOURCES, tmp_path)  # the same folder, now without robust accuracy
    assert files.robust_after_transfer is None and not (tmp_path / "robust_after_transfer.png").exists()
    text = files.markdown.read_text(encoding="utf-8")
    assert "robust_after_transfer.png: not drawn (no run measured robust accuracy after transfer)" in text
    assert "robust acc after transfer (robust / standard source)" not in text
    assert files.html.read_text(encoding="utf-8").count("data:image/png;base64,") == 3


def test_no_runs_is_an_error_that_says_what_to_do(tmp_path):
    with pytest.raises(RobustTransferError, match="robust-transfer study run"):
        write_report([], SOURCES, tmp_path / "out")
    with pytest.raises(RobustTransferError, match="no finished transfer runs"):
        table1([])
