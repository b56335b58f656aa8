"""Faults and misleading results: gradient masking, unwritable or full disks, torn writes, SIGKILL.

docs/RELIABILITY.md lists every fault the project handles and the test that shows it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from robust_transfer import Attack, RobustTransferError, ThreatModel, atomic, evaluate, load_dataset, rundir
from robust_transfer.atomic import atomic_write, atomic_write_text
from robust_transfer.cli import main
from robust_transfer.evaluation import EvalResult
from robust_transfer.masking import MaskingMeasurements, judge, masking_checks
from robust_transfer.models import create_model, load_model
from robust_transfer.rundir import prepare_output_dir
from robust_transfer.train import PretrainConfig, loop, pretrain
from robust_transfer.train.checkpoint import load_checkpoint, save_checkpoint
from robust_transfer.transfer import transfer
from tests.test_data import _write_idx
from tests.test_pretrain import TINY, _cli_args, check_a_non_finite_loss_keeps_the_last_good_checkpoint

# ---------------------------------------------------------------- gradient masking


class Quantised(nn.Module):
    """Rounds its input to a few grey levels first: torch.round has zero gradient, so PGD is blind.

    The decision itself is easy to flip (a big enough change of the image changes the class),
    which is what makes its perfect robust accuracy a lie.
    """

    def __init__(self, inner: nn.Module, levels: int = 8) -> None:
        super().__init__()
        self.inner, self.levels = inner, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * self.levels) / self.levels)


@pytest.mark.parametrize("threat", [ThreatModel("l2", 0.5), ThreatModel("linf", 0.08)])
def test_a_trained_model_gets_no_masking_warning(linear_model, separable_data, threat):
    result = evaluate(linear_model, separable_data, threat, masking_check=True)
    assert 0 < result.robust_acc < result.clean_acc
    assert result.warnings == [] and result.to_dict()["warnings"] == []


def test_a_gradient_masking_model_looks_robust_and_is_flagged(linear_model, separable_data, caplog):
    masked = Quantised(linear_model)
    threat = ThreatModel("linf", 0.08)
    x, y = separable_data
    assert evaluate(linear_model, separable_data, threat).robust_acc < 0.5
    with torch.no_grad():
        assert (masked(1 - x).argmax(1) == y).float().mean() < 0.1  # its decisions can be flipped
    with caplog.at_level(logging.WARNING, logger="robust_transfer.evaluation"):
        result = evaluate(masked, separable_data, threat, masking_check=True)
    assert result.robust_acc == result.clean_acc == 1.0  # "perfectly robust": the symptom to catch
    text = "\n".join(result.warnings)
    assert "gradient with respect to the input is exactly zero for 100.0%" in text
    assert "allowed to reach any image (linf eps=1" in text and "not trustworthy" in text
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == result.warnings
    assert result.to_dict()["warnings"] == result.warnings


def test_a_random_start_that_weakens_the_attack_is_reported_without_crying_masking(linear_model, separable_data):
    # L2 PGD from a random point on the sphere turns towards the best direction only slowly: on this
    # linear model it stays about 6 points weaker than PGD from the input, however many steps it takes.
    warnings = masking_checks(linear_model, separable_data, Attack(ThreatModel("l2", 0.6)))
    assert len(warnings) == 1 and warnings[0].startswith("the random start weakens the attack")
    assert "masking" not in warnings[0]


def test_an_attack_with_too_few_steps_is_flagged_as_not_converged(linear_model, separable_data):
    warnings = masking_checks(linear_model, separable_data, Attack(ThreatModel("l2", 1.0), steps=1, step_size=0.2))
    assert len(warnings) == 1
    assert "not converged: 5 steps give robust accuracy" in warnings[0] and "with 1 step " in warnings[0]


def _measured(**changes) -> MaskingMeasurements:
    healthy = dict(n=256, clean_acc=0.9, eps=0.5, by_eps={0.25: 0.7, 0.5: 0.5, 1.0: 0.2}, unbounded_eps=1.0,
                   unbounded_acc=0.0, no_random_start_acc=0.51, random_start_acc=0.5, steps=10, more_steps=50,
                   more_steps_acc=0.49, zero_gradient_fraction=0.0)
    return MaskingMeasurements(**{**healthy, **changes})


@pytest.mark.parametrize("changes,message", [
    ({}, None),
    ({"by_eps": {0.25: 0.5, 0.5: 0.6, 1.0: 0.2}, "more_steps_acc": 0.59},
     r"rises with eps \(50.0% at eps=0.25, 60.0% at eps=0.5\)"),
    ({"unbounded_acc": 0.3}, r"reach any image .* still leaves 30.0% correct"),
    ({"no_random_start_acc": 0.7}, r"gradient masking: PGD from a random start leaves 50.0% .* at the input leaves 70"),
    ({"random_start_acc": 0.7, "by_eps": {0.25: 0.7, 0.5: 0.7, 1.0: 0.2}, "more_steps_acc": 0.7},
     r"^the random start weakens the attack: .* input leaves 51.0% .* random start leaves 70.0%.*--restarts"),
    ({"more_steps_acc": 0.3}, r"not converged: 50 steps .* 30.0% against 50.0% with 10 steps"),
    ({"zero_gradient_fraction": 0.5}, r"exactly zero for 50.0%"),
    # Within the tolerances: noise, not a symptom.
    ({"by_eps": {0.25: 0.5, 0.5: 0.51, 1.0: 0.2}, "unbounded_acc": 0.1, "more_steps_acc": 0.46,
      "zero_gradient_fraction": 0.1}, None),
])
def test_each_masking_rule_fires_on_its_symptom_only(changes, message):
    warnings = judge(_measured(**changes), ThreatModel("l2", 0.5))
    if message is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and re.search(message, warnings[0]), warnings


def test_eval_results_without_the_new_field_still_work(linear_model, separable_data):
    old_style = EvalResult(0.9, 0.5, 10, "l2(eps=1)", 20, 0, 1.5)
    assert old_style.warnings == [] and old_style.to_dict()["warnings"] == []
    # No threat: nothing to check, and no extra work.
    assert evaluate(linear_model, separable_data, masking_check=True).warnings == []


# ---------------------------------------------------------------- bad evaluation data


def test_labels_outside_the_models_classes_are_a_clear_error(linear_model, separable_data):
    x, y = separable_data
    y = y.clone()
    y[70] = 2  # the model has two outputs
    with pytest.raises(RobustTransferError, match=r"label 2 of example 70 is outside 0\.\.1.*transfer it"):
        evaluate(linear_model, (x, y), ThreatModel("l2", 0.5), batch_size=64)
    y[70] = -1
    with pytest.raises(RobustTransferError, match=r"label -1 of example 70"):
        evaluate(linear_model, (x, y))


def test_empty_or_mismatched_evaluation_data_is_a_clear_error(linear_model, separable_data):
    x, y = separable_data
    with pytest.raises(RobustTransferError, match="no examples"):
        evaluate(linear_model, (x[:0], y[:0]))
    with pytest.raises(RobustTransferError, match="differ in length: 256 vs 255"):
        evaluate(linear_model, (x, y[:-1]))


def test_dataset_labels_outside_its_class_list_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 20), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 28, 28)), False)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(count) % 10, False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([12] + [0] * 9), False)  # Fashion-MNIST has 10
    with pytest.raises(RobustTransferError, match=r"labels must lie in 0\.\.9, found 0\.\.12"):
        load_dataset("fashion-mnist", tmp_path)


# ---------------------------------------------------------------- damaged weight files


def test_a_state_dict_with_missing_or_extra_keys_names_them(tmp_path):
    state = create_model("small_resnet", num_classes=10, in_channels=1).state_dict()
    missing = {k: v for k, v in state.items() if k != "model.layer1.0.bn2.running_var"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(RobustTransferError, match=r"do not fit .*'small_resnet'; missing keys: model\.layer1\.0\.bn2"):
        load_model(tmp_path / "missing.pt", arch="small_resnet")
    torch.save({**state, "model.extra.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(RobustTransferError, match=r"unexpected keys: model\.extra\.weight"):
        load_model(tmp_path / "extra.pt", arch="small_resnet")


# ---------------------------------------------------------------- training faults


def test_a_corrupt_or_torn_checkpoint_is_refused_on_resume_naming_it(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "model": {"w": torch.ones(1000)}})
    for damage in (lambda data: data[: len(data) // 2], lambda data: b"garbage" * 10):
        path.write_bytes(damage(path.read_bytes()))
        with pytest.raises(RobustTransferError, match=rf"cannot read checkpoint {path} .*delete it"):
            pretrain(PretrainConfig(**TINY, method="standard", out_dir=str(tmp_path), resume=True))


def test_an_infinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    check_a_non_finite_loss_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch, float("inf"), r"loss became inf at epoch 2, batch 2 of 4.*epoch 1.*intact")


# ---------------------------------------------------------------- output folders and disks


def test_a_folder_under_a_regular_file_is_refused_naming_it(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RobustTransferError, match=r"cannot write to the output folder .*file/run.*another output"):
        prepare_output_dir(blocker / "run")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_a_read_only_folder_is_refused_naming_it(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(RobustTransferError, match=rf"cannot write to the output folder {folder}: Permission"):
            prepare_output_dir(folder)
        with pytest.raises(RobustTransferError, match="cannot write to the output folder"):
            pretrain(PretrainConfig(**TINY, method="standard", out_dir=str(folder / "run")))
    finally:
        folder.chmod(0o700)


def _free_space(monkeypatch, free: int) -> None:
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: SimpleNamespace(total=2**40, used=2**40 - free,
                                                                                 free=free))


def test_a_full_disk_is_refused_naming_the_folder_and_what_to_do(tmp_path, monkeypatch):
    _free_space(monkeypatch, 10 * 2**20)
    with pytest.raises(RobustTransferError) as info:
        prepare_output_dir(tmp_path / "run")
    message = str(info.value)
    assert str(tmp_path / "run") in message and "only 10 MiB free" in message and "at least 200 MiB" in message
    assert "free some space or choose another output folder" in message


def test_a_run_can_ask_for_more_free_space(tmp_path, monkeypatch):
    _free_space(monkeypatch, 500 * 2**20)
    assert prepare_output_dir(tmp_path) == tmp_path
    with pytest.raises(RobustTransferError, match="only 500 MiB free .* needs at least 2048 MiB"):
        prepare_output_dir(tmp_path, min_free_bytes=2 * 2**30)
    _free_space(monkeypatch, 0)
    assert prepare_output_dir(tmp_path, min_free_bytes=0) == tmp_path


def test_pretraining_on_a_full_disk_fails_before_any_work(tmp_path, monkeypatch):
    _free_space(monkeypatch, 2**20)

    def no_work(*args, **kwargs):
        raise AssertionError("work started on a full disk")

    monkeypatch.setattr(loop, "load_dataset", no_work)
    monkeypatch.setattr(loop, "_run_epoch", no_work)
    with pytest.raises(RobustTransferError, match=f"only 1 MiB free on the disk of {tmp_path / 'run'}"):
        pretrain(PretrainConfig(**TINY, method="standard", out_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()  # nothing left, not even the folder it created


def test_a_run_that_fails_before_writing_leaves_no_folder_behind(tmp_path, capsys):
    out = tmp_path / "runs" / "first"
    assert main(["pretrain", "--dataset", "no-such-set", "--out-dir", str(out)]) == 2
    assert main(["transfer", str(tmp_path / "missing.safetensors"), "--dataset", "digits", "--out-dir", str(out)]) == 2
    assert "no-such-set" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # the folders these runs created went with them
    kept = tmp_path / "mine"
    kept.mkdir()
    assert main(["pretrain", "--dataset", "no-such-set", "--out-dir", str(kept)]) == 2
    assert kept.is_dir()  # a folder that was there before stays


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_first(tmp_path, capsys):
    # As when a resumed run starts while the killed run's torchrun workers still write to the folder.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with rundir.exclusive_run(run_dir):
        code = main(["pretrain", *_cli_args(dict(TINY, method="standard")), "--out-dir", str(run_dir)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1
        assert f"another run (pid {os.getpid()}) is writing to {run_dir}" in err
        with pytest.raises(RobustTransferError, match="another run .* is writing to"):
            transfer(source=str(tmp_path / "unused.safetensors"), dataset="digits", out_dir=str(run_dir))
    assert not (run_dir / "checkpoint.pt").exists()
    # Released with its holder: the folder can be used again.
    with rundir.exclusive_run(run_dir):
        pass


# ---------------------------------------------------------------- atomic writes


def _disk_full(handle) -> None:
    handle.write(b"half of the new cont")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_write_that_fails_midway_keeps_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "state.bin"
    target.write_bytes(b"the old content")
    with pytest.raises(OSError) as info:
        atomic_write(target, _disk_full)
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"the old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.bin"]


def test_a_failed_rename_keeps_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    atomic_write_text(target, '{"old": true}')

    def failing_replace(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output"):
        atomic_write_text(target, '{"new": true}')
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


class _FillsUp:
    """A file handle on a disk with ``room`` bytes left: writes beyond that fail with ENOSPC."""

    def __init__(self, handle, room: int) -> None:
        self._handle, self._room = handle, room

    def write(self, data) -> int:
        size = len(memoryview(data).cast("B"))
        if size > self._room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= size
        return self._handle.write(data)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


def test_a_checkpoint_written_onto_a_full_disk_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "model": {"w": torch.ones(4)}})
    real_fdopen = os.fdopen
    monkeypatch.setattr(atomic.os, "fdopen", lambda fd, mode: _FillsUp(real_fdopen(fd, mode), room=4096))
    with pytest.raises(RobustTransferError, match=r"cannot write the checkpoint .*No space left on device.*--resume"):
        save_checkpoint(path, {"epoch": 2, "model": {"w": torch.zeros(100_000)}})
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.ones(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


# ---------------------------------------------------------------- SIGKILL at random moments

KILL_RUN = dict(TINY, precision="fp32", eval_examples=64, eval_steps=1, test_examples=64, test_steps=1)


# One thread: two cores shared by busy processes make multi-threaded CPU kernels crawl. Every run of a
# comparison uses the same setting, so the weights stay comparable bit for bit.
_ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _command(config: dict, run_dir: Path) -> list[str]:
    # --resume from the start: a first run has nothing to resume and simply begins.
    return [sys.executable, "-m", "robust_transfer", "pretrain", *_cli_args(config), "--out-dir", str(run_dir),
            "--resume"]


def _assert_intact(run_dir: Path, epochs: int, last_epoch: int) -> int:
    """Whatever a kill left must load: the checkpoint (never older than before) and the model file."""
    checkpoint = run_dir / "checkpoint.pt"
    if not checkpoint.exists():
        assert last_epoch == 0, "the checkpoint disappeared"
        return 0
    state = load_checkpoint(checkpoint)  # raises on a torn or corrupt file
    assert last_epoch <= state["epoch"] <= epochs
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    if (run_dir / "model.safetensors").exists():
        load_file(run_dir / "model.safetensors")
    return state["epoch"]


def _timed_reference(config: dict, run_dir: Path) -> tuple[float, float, float]:
    """Run uninterrupted; return the phases of a run: startup, one epoch, and final test plus saving (seconds)."""
    checkpoint = run_dir / "checkpoint.pt"
    started, seen, written = time.monotonic(), None, []
    with open(run_dir.parent / "reference-stderr.txt", "w") as stderr:
        process = subprocess.Popen(_command(config, run_dir), stdout=subprocess.DEVNULL, stderr=stderr,
                                           env=_ENV)
        while process.poll() is None and time.monotonic() - started < 600:
            stamp = checkpoint.stat().st_mtime_ns if checkpoint.exists() else None
            if stamp != seen:
                seen = stamp
                written.append(time.monotonic() - started)
            time.sleep(0.02)
        process.kill()
        process.wait()
    total = time.monotonic() - started
    assert process.returncode == 0, (run_dir.parent / "reference-stderr.txt").read_text()[-3000:]
    assert written, "no checkpoint was ever written"
    epoch = (written[-1] - written[0]) / (len(written) - 1) if len(written) > 1 else written[0] / 2
    return max(written[0] - epoch, 0.0), epoch, total - written[-1]


def _kill_and_resume(config: dict, tmp_path: Path, kills: int, seed: int) -> dict:
    """SIGKILL pretraining ``kills`` times at seeded random moments, resuming after each, until it finishes.

    Each kill lands uniformly over the expected length of the run it interrupts (startup, the
    epochs still to do, checkpoint writes, final test and saving: timed on an uninterrupted
    reference run), so kills reach every phase. When a run finishes before all kills are spent, a
    fresh run starts. Every finished run must match the reference bit for bit.
    """
    started = time.monotonic()
    reference_dir = tmp_path / "reference"
    startup, epoch, final = _timed_reference(config, reference_dir)
    expected = load_file(reference_dir / "model.safetensors")
    rng = random.Random(seed)
    done = rounds = 0
    epochs_at_kills: list[int] = []
    leftovers: list[str] = []
    while done < kills:
        run_dir, last_epoch = tmp_path / f"killed-{rounds}", 0
        while True:
            remaining = startup + (config["epochs"] - last_epoch) * epoch + final
            with open(tmp_path / "stderr.txt", "w") as stderr:
                process = subprocess.Popen(_command(config, run_dir), stdout=subprocess.DEVNULL, stderr=stderr,
                                           env=_ENV)
                try:
                    process.wait(timeout=rng.uniform(0, remaining) if done < kills else 600)
                except subprocess.TimeoutExpired:
                    process.send_signal(signal.SIGKILL)
                    process.wait()
            if process.returncode == -signal.SIGKILL:
                done += 1
                last_epoch = _assert_intact(run_dir, config["epochs"], last_epoch)
                epochs_at_kills.append(last_epoch)
                continue
            assert process.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
            break
        actual = load_file(run_dir / "model.safetensors")
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[k], actual[k]) for k in expected), f"round {rounds} differs"
        epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert epochs == list(range(1, config["epochs"] + 1))
        leftovers += [p.name for p in run_dir.glob(".*.tmp")]  # temp files of writes cut short by a kill
        rounds += 1
    return {"kills": done, "rounds": rounds, "checkpoint_epoch_after_each_kill": epochs_at_kills,
            "leftover_temp_files": leftovers, "seconds": round(time.monotonic() - started, 1),
            "phases": [round(startup, 1), round(epoch, 1), round(final, 1)]}


@pytest.mark.slow  # -m slow, for suite time: kills at fixed moments are tested in test_pretrain, test_transfer_resume
def test_a_few_kills_at_random_moments_end_with_the_same_weights(tmp_path):
    config = dict(KILL_RUN, method="standard", epochs=2, train_examples=256)
    report = _kill_and_resume(config, tmp_path, kills=3, seed=0)
    print(report)
    assert report["kills"] == 3


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_twenty_kills_at_random_moments_end_with_the_same_weights(tmp_path):
    config = dict(KILL_RUN, method="pgd", attack_steps=1, epochs=3, train_examples=512)
    report = _kill_and_resume(config, tmp_path, kills=20, seed=1)
    print(report)
    assert report["kills"] == 20


def test_a_resumed_run_removes_the_temporary_files_of_killed_writes(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    leftover = run_dir / ".checkpoint.pt.k1ll3d.tmp"
    leftover.write_bytes(b"half a checkpoint")
    keep = run_dir / "notes.txt"
    keep.write_text("mine")
    pretrain(PretrainConfig(**{**TINY, "method": "standard", "eps": 0.0}, out_dir=str(run_dir), resume=True))
    assert not leftover.exists() and keep.read_text() == "mine"
    assert not list(run_dir.glob(".*.tmp"))

