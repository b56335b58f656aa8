"""Studies: spec checking, planning, the store's exactly-once claims, kill and resume, concurrency, Ray, report."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from robust_transfer.errors import RobustTransferError
from robust_transfer.study import Store, load_outcomes, load_spec, parse_spec, plan_runs, run_study, study_status
from robust_transfer.study.plan import Run
from robust_transfer.study.store import worker_identity

# A study small enough for CI: two Fashion-MNIST sources (eps 0 and 1), digits as the target, two modes.
TINY_SPEC = """
name = "tiny"
out_dir = "{out}"
targets = ["digits"]
modes = ["fixed", "full"]
seeds = [0]

[threat]
norm = "l2"
eps = 1.0
steps = 2
examples = 64

[[sources]]
label = "fm"
eps = [0, 1]
[sources.pretrain]
dataset = "fashion-mnist"
arch = "small_resnet"
epochs = 1
train_examples = 256
batch_size = 64
attack_steps = 1
eval_examples = 64
eval_steps = 1
test_examples = 100
lr = 0.05
precision = "fp32"

[transfer]
train_examples = 256
epochs = 1
precision = "fp32"

[transfer.full]
lrs = [0.1]
refit = false
"""

TIMING_OR_PATH = {"timings", "seconds", "train_seconds", "model_path", "run_dir", "config", "total_s", "path"}


def write_spec(tmp_path: Path, name: str = "spec.toml", out: str = "out", text: str = TINY_SPEC) -> Path:
    path = tmp_path / name
    path.write_text(text.format(out=tmp_path / out))
    return path


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "robust_transfer.cli", *args], capture_output=True, text=True,
                          **kwargs)


def comparable(store_path: Path) -> dict[str, tuple[str, object]]:
    """Each run's status and result without timings or paths: what two equivalent studies must agree on."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in TIMING_OR_PATH}
        return value

    with Store(store_path, create=False) as store:
        return {row.key: (row.status, strip(row.result)) for row in store.rows()}


# -- the spec ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s.replace('modes = ["fixed", "full"]', 'modes = ["fixed", "sideways"]'), "modes: unknown mode"),
    (lambda s: s.replace("epochs = 1\nprecision", "epoch = 1\nprecision"), "[transfer]: unknown field 'epoch'"),
    (lambda s: s.replace('targets = ["digits"]', 'targets = ["digitz"]'), "unknown dataset 'digitz'"),
    (lambda s: s.replace("eps = [0, 1]", "eps = [0, -1]"), "sources[0].pretrain"),
    (lambda s: s.replace("[transfer.full]", "[transfer.partial]"), "[transfer.partial]"),
    (lambda s: s.replace('norm = "l2"', 'norm = "l3"'), "threat"),
    (lambda s: s + "\n[grid]\nbatch_size = 64\n", "[grid].batch_size: expected a non-empty list"),
    (lambda s: s + "\n[grid]\nlrs = [[0.1], [-1.0]]\n", "[grid]"),
])
def test_spec_errors_name_the_file_and_field(tmp_path, edit, expected):
    path = tmp_path / "bad.toml"
    path.write_text(edit(TINY_SPEC.format(out=tmp_path / "out")))
    with pytest.raises(RobustTransferError) as error:
        load_spec(path)
    assert str(path) in str(error.value) and expected in str(error.value)


def test_spec_errors_reach_the_user_as_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("name = 'x'\ntargets = ['digits']\n[[sources]]\nzoo = 'a'\nfile = 'b'\n")
    result = cli("study", "run", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {path}: sources[0]: give exactly one of zoo = NAME, file = PATH or a [sources.pretrain] table"]


def test_missing_model_file_is_named(tmp_path):
    spec = parse_spec({"targets": ["digits"], "sources": [{"file": "nowhere.safetensors"}]}, origin="s.toml",
                      base=tmp_path)
    with pytest.raises(RobustTransferError, match="no model file at .*nowhere.safetensors"):
        plan_runs(spec)


# -- planning ----------------------------------------------------------------------------------------


def test_plan_expands_the_grid_and_keys_ignore_where_runs_write(tmp_path):
    spec = load_spec(write_spec(tmp_path))
    runs = plan_runs(spec)
    kinds = [r.kind for r in runs]
    # 2 pretrainings + 2 source evaluations + 2 sources x 1 target x 2 modes x 1 seed.
    assert kinds.count("pretrain") == 2 and kinds.count("evaluate") == 2 and kinds.count("transfer") == 4
    assert len({r.key for r in runs}) == len(runs)
    by_key = {r.key: r for r in runs}
    for run in runs:  # dependencies come first
        if run.depends_on:
            assert runs.index(by_key[run.depends_on]) < runs.index(run)

    moved = load_spec(write_spec(tmp_path, "moved.toml", out="elsewhere"))
    assert [r.key for r in plan_runs(moved)] == [r.key for r in runs]

    text = TINY_SPEC.replace("seeds = [0]", "seeds = [0, 1]") + "\n[grid]\nbatch_size = [32, 64]\n"
    bigger = plan_runs(load_spec(write_spec(tmp_path, "bigger.toml", text=text)))
    assert sum(r.kind == "transfer" for r in bigger) == 4 * 2 * 2
    with Store(tmp_path / "s.sqlite") as store:
        assert store.add_runs(runs) == 8
        assert store.add_runs(runs) == 0
        # Pretrainings are shared, and batch_size 64 with seed 0 is the default: those 4 runs exist already.
        assert store.add_runs(bigger) == 12


# -- the store ---------------------------------------------------------------------------------------


def fake_runs(count: int) -> list[Run]:
    return [Run(key=f"k{i:03d}", kind="transfer", label=f"run {i}", config={"i": i}) for i in range(count)]


def test_a_claim_is_recorded_once_and_only_by_its_holder(tmp_path):
    with Store(tmp_path / "s.sqlite") as store:
        store.add_runs(fake_runs(2))
        first = store.claim()
        second = store.claim()
        assert first.run.key != second.run.key and store.claim() is None
        assert store.record_done(first, {"x": 1}, 1.0)
        assert not store.record_done(first, {"x": 2}, 1.0)  # already recorded
        stolen = type(second)(second.run, "not-the-token")
        assert not store.record_done(stolen, {"x": 3}, 1.0)
        assert store.record_failed(second, "boom", 1.0)
        rows = {r.key: r for r in store.rows()}
        assert rows[first.run.key].result == {"x": 1} and rows[second.run.key].error == "boom"


def test_runs_of_dead_workers_go_back_to_pending(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner, host, _ = worker_identity()
    with Store(tmp_path / "s.sqlite", lease_s=60) as store:
        store.add_runs(fake_runs(3))
        alive = store.claim()
        silent = store.claim(owner="remote", host="another-host", pid=1)  # a heartbeat that stopped
        orphan = store.claim(owner="dead", host=host, pid=dead.pid)       # its process is gone
        now = time.time()
        assert store.requeue_stale(now=now) == 1
        store.heartbeat([alive.token], now=now + 100)
        assert store.requeue_stale(now=now + 120) == 1
        assert {r.key for r in store.rows(status="pending")} == {orphan.run.key, silent.run.key}
        assert not store.record_done(orphan, {}, 0.0)  # the dead worker's claim no longer counts
        assert {r.key for r in store.rows(status="running")} == {alive.run.key}


def test_claims_from_many_processes_never_overlap(tmp_path):
    path = tmp_path / "s.sqlite"
    with Store(path) as store:
        store.add_runs(fake_runs(40))
    code = ("import sys, json; from robust_transfer.study import Store\n"
            "s = Store(sys.argv[1]); keys = []\n"
            "while (c := s.claim()) is not None:\n"
            "    keys.append(c.run.key); s.record_done(c, {}, 0.0)\n"
            "print(json.dumps(keys))")
    workers = [subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
               for _ in range(4)]
    claimed = [key for w in workers for key in json.loads(w.communicate(timeout=120)[0])]
    assert sorted(claimed) == [f"k{i:03d}" for i in range(40)]
    with Store(path) as store:
        assert all(r.attempts == 1 and r.status == "done" for r in store.rows())


def test_a_failed_dependency_blocks_its_dependents_without_hanging(tmp_path):
    runs = [Run("a", "pretrain", "a", {}), Run("b", "transfer", "b", {}, depends_on="a")]
    with Store(tmp_path / "s.sqlite") as store:
        store.add_runs(runs)
        store.record_failed(store.claim(), "broken", 0.0)
        assert store.claim() is None
        assert store.counts()["blocked"] == 1 and not store.runnable_left()


# -- whole studies -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_study(tmp_path_factory):
    """The tiny study run start to finish in one process: the yardstick for interrupted runs."""
    tmp = tmp_path_factory.mktemp("reference")
    # Two worker processes, as the kill test uses: float results depend on the threads per worker.
    result = cli("study", "run", str(write_spec(tmp)), "--workers", "2", "--no-progress")
    assert result.returncode == 0, result.stderr
    return tmp, tmp / "out" / "study.sqlite"


def test_a_study_runs_end_to_end_and_reports(reference_study):
    tmp, store_path = reference_study
    with Store(store_path, create=False) as store:
        status = study_status(store)
        assert status.counts["done"] == 8 and status.finished
        sources, transfers = load_outcomes(store)
        rows = store.rows("transfer")
    assert {s.source: s.eps for s in sources} == {"fm-eps0": 0.0, "fm-eps1": 1.0}
    assert all(s.robust_acc is not None and s.robust_acc <= s.clean_acc for s in sources)
    assert sorted((t.source, t.mode) for t in transfers) == [
        ("fm-eps0", "fixed"), ("fm-eps0", "full"), ("fm-eps1", "fixed"), ("fm-eps1", "full")]
    for row in rows:  # every transfer measured robustness after transfer under the study's threat
        assert row.result["robust"]["threat"] == "l2(eps=1)"
    # Features were extracted once per (source, target) and reused: one cached file per split and source.
    assert len(list((tmp / "out" / "features").glob("*.safetensors"))) == 2 * 3

    result = cli("report", str(store_path), "--out", str(tmp / "report"))
    assert result.returncode == 0, result.stderr
    check_report_matches_store(tmp / "report", transfers)


def check_report_matches_store(report: Path, transfers) -> None:
    """Table 1 holds, per mode, the standard and the robust run's test scores as the store has them."""
    import csv

    with open(report / "table1.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert sorted(row["mode"] for row in table) == ["fixed", "full"]
    for row in table:
        for side, eps in (("standard", 0.0), ("robust", 1.0)):
            (run,) = [t for t in transfers if t.mode == row["mode"] and t.eps == eps]
            assert float(row[f"{side}_test"]) == pytest.approx(run.test_score, abs=1e-6)
    assert (report / "report.html").read_text().count("data:image/png;base64,") >= 1


def test_a_second_run_of_a_finished_study_does_nothing(reference_study):
    tmp, store_path = reference_study
    before = comparable(store_path)
    with Store(store_path, create=False) as store:
        finished = {r.key: r.finished for r in store.rows()}
    run_study(load_spec(tmp / "spec.toml"), workers=1, progress=False)
    with Store(store_path, create=False) as store:
        assert {r.key: r.finished for r in store.rows()} == finished
    assert comparable(store_path) == before


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _done_count(path: Path) -> int:
    if not path.exists():
        return 0
    with Store(path) as store:
        return store.counts()["done"]


def test_a_killed_study_resumes_to_the_same_store(reference_study, tmp_path):
    _, reference = reference_study
    spec = write_spec(tmp_path)
    store_path = tmp_path / "out" / "study.sqlite"
    study = subprocess.Popen([sys.executable, "-m", "robust_transfer.cli", "study", "run", str(spec), "--workers",
                              "2", "--no-progress"], start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:  # kill the supervisor and its workers at once, mid-way through the study
        _wait_for(lambda: _done_count(store_path) >= 3, 300, "three finished runs")
    finally:
        os.killpg(study.pid, signal.SIGKILL)
        study.wait()
    assert _done_count(store_path) < 8
    result = cli("study", "run", str(spec), "--workers", "2", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert comparable(store_path) == comparable(reference)


@pytest.mark.slow  # -m slow: the store's exactly-once claims across processes are also tested directly above
def test_two_study_processes_share_one_store_and_run_each_run_once(tmp_path):
    spec = write_spec(tmp_path)
    studies = [subprocess.Popen([sys.executable, "-m", "robust_transfer.cli", "study", "run", str(spec),
                                 "--workers", "1", "--no-progress"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for study in studies:
        _, stderr = study.communicate(timeout=600)
        assert study.returncode == 0, stderr
    with Store(tmp_path / "out" / "study.sqlite", create=False) as store:
        rows = store.rows()
        assert len(rows) == 8 and all(r.status == "done" and r.attempts == 1 for r in rows)
        assert len({r.owner for r in rows}) == 2  # both processes did work


def test_failed_runs_keep_their_error_and_can_be_retried_alone(tmp_path, reference_study):
    _, reference = reference_study
    with Store(reference, create=False) as store:
        model = next(r for r in store.rows("pretrain")).result["model_path"]
    folder = tmp_path / "images"
    text = (f'name = "folder"\nout_dir = "{tmp_path / "out"}"\n'
            f'targets = [{{ dataset = "imagefolder", data_root = "{folder}" }}]\n'
            f'[[sources]]\nlabel = "m"\nfile = "{model}"\n[transfer]\nprecision = "fp32"\n')
    spec = tmp_path / "spec.toml"
    spec.write_text(text)
    result = cli("study", "run", str(spec), "--workers", "1", "--no-progress")
    assert result.returncode == 1
    status = cli("study", "status", str(spec))
    assert "1 failed" in status.stdout and str(folder) in status.stdout

    from PIL import Image

    for split in ("train", "test"):
        for label, shade in (("dark", 40), ("light", 220)):
            (folder / split / label).mkdir(parents=True, exist_ok=True)
            for i in range(12):
                Image.new("L", (28, 28), shade + i).save(folder / split / label / f"{i}.png")
    retried = cli("study", "retry", str(spec))
    assert retried.returncode == 0, retried.stderr
    with Store(tmp_path / "out" / "study.sqlite", create=False) as store:
        (row,) = store.rows()
        assert row.status == "done" and row.attempts == 2 and row.error is None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_ray_executor_runs_a_study_on_a_local_cluster(tmp_path, reference_study):
    pytest.importorskip("ray")
    _, reference = reference_study
    ray = Path(sys.executable).with_name("ray")
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    started = subprocess.run([str(ray), "start", "--head", f"--port={port}", "--num-cpus=2",
                              "--include-dashboard=false",
                              "--disable-usage-stats"], capture_output=True, text=True, env=env, timeout=180)
    assert started.returncode == 0, started.stderr
    try:
        spec = write_spec(tmp_path)
        result = cli("study", "run", str(spec), "--executor", "ray", "--address", f"127.0.0.1:{port}",
                     "--no-progress", env=env, timeout=600)
        assert result.returncode == 0, result.stderr
    finally:
        subprocess.run([str(ray), "stop", "--force"], capture_output=True, env=env, timeout=120)
    store_path = tmp_path / "out" / "study.sqlite"
    with Store(store_path, create=False) as store:
        assert all(r.status == "done" and r.attempts == 1 for r in store.rows())
    # Ray workers choose their own thread counts, so scores agree closely rather than bit for bit.
    with Store(store_path, create=False) as ours, Store(reference, create=False) as theirs:
        expected = {t.key: t.test_score for t in load_outcomes(theirs)[1]}
        assert {t.key: t.test_score for t in load_outcomes(ours)[1]} == pytest.approx(expected, abs=0.05)
