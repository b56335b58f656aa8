"""The README's main command: the demo runs end to end and reuses finished work on a second call."""

from __future__ import annotations

from robust_transfer.demo import TARGETS, run_demo


def test_quick_demo_prints_both_tables_and_reuses_its_runs(tmp_path):
    first = run_demo(tmp_path, quick=True, progress=False)
    assert "| standard (eps 0) |" in first and "| robust (eps 1) |" in first
    assert all(target in first for target in TARGETS) and "transfers better on" in first
    results = sorted((tmp_path / "quick").glob("fashion-mnist-*/results.json"))
    assert len(results) == 2
    stamps = [path.stat().st_mtime_ns for path in results]
    second = run_demo(tmp_path, quick=True, progress=False)
    assert [path.stat().st_mtime_ns for path in results] == stamps  # pretraining was not redone
    assert second.splitlines()[3:6] == first.splitlines()[3:6]  # the same models measure the same
