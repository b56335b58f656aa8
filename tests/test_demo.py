"""The README's main command: the demo study runs end to end and reuses finished work on a second call."""

from __future__ import annotations

from robust_transfer.demo import QUICK, TARGETS, run_demo
from robust_transfer.study import Store


def test_quick_demo_prints_the_papers_table_and_reuses_its_runs(tmp_path):
    first = run_demo(tmp_path, quick=True, progress=False)
    store_path = tmp_path / "quick" / "study.sqlite"
    with Store(store_path, create=False) as store:
        rows = store.rows()
    sources = len(QUICK.source_eps)
    # Per source: a pretraining, its evaluation, its inversion row, and fixed + full transfer to each target.
    assert len(rows) == sources * (3 + 2 * len(TARGETS)) and all(r.status == "done" for r in rows)
    assert all(target in first for target in TARGETS)
    assert "## Perceptual alignment" in first and (tmp_path / "quick" / "report" / "inversion.png").is_file()
    assert "robust sources win on" in first and "Fixed-feature" in first and "Full-network" in first
    assert (tmp_path / "quick" / "report" / "report.html").is_file() and str(store_path) in first

    second = run_demo(tmp_path, quick=True, progress=False)
    with Store(store_path, create=False) as store:
        assert [(r.key, r.finished) for r in store.rows()] == [(r.key, r.finished) for r in rows]  # nothing rerun
    assert second == first  # the same store gives the same report
