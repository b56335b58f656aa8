"""Fine-tuning checkpoints: a transfer killed mid-run and resumed ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import robust_transfer
from robust_transfer.errors import RobustTransferError
from robust_transfer.models import create_model, load_model, save_model
from robust_transfer.train.checkpoint import load_checkpoint
from robust_transfer.transfer import transfer
from tests.processes import kill_when

# Runs transfer(**settings); with a file name prefix given, it sleeps after writing the first checkpoint so named,
# so the test can kill it right there, between two epochs, as a crash would.
SCRIPT = """
import json, logging, sys, time
import robust_transfer.train.fit as fit
from robust_transfer.transfer import transfer

logging.basicConfig(level=logging.INFO, format="%(message)s")
settings, pause_at = json.loads(sys.argv[1]), sys.argv[2]
save = fit.save_checkpoint

def save_then_pause(path, state):
    save(path, state)
    if pause_at and path.name.startswith(pause_at):
        print("paused", flush=True)
        time.sleep(600)

fit.save_checkpoint = save_then_pause
transfer(**settings)
"""


def _start(settings: dict, pause_at: str = "") -> subprocess.Popen:
    # One thread each: the same arithmetic in every run, and no spinning threads fighting over shared cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(robust_transfer.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(settings), pause_at], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    torch.manual_seed(0)
    return str(save_model(create_model("small_resnet", 10, 1), tmp_path_factory.mktemp("source") / "source"))


def test_a_killed_transfer_resumes_to_the_uninterrupted_result(tmp_path, source):
    settings = dict(source=source, dataset="animal-mnist", mode="full", epochs=3, lrs=[0.01, 0.001], batch_size=16,
                    train_examples=64, val_fraction=0.02, precision="fp32", device="cpu", progress=False)
    whole = _start({**settings, "out_dir": str(tmp_path / "whole")})
    killed_dir = tmp_path / "killed"
    # Killed in the refit, after its first epoch: both learning rates are finished, and the final weights are
    # those of the continued refit, so they show any state a resume failed to restore.
    killed = _start({**settings, "out_dir": str(killed_dir)}, pause_at="refit-")
    checkpoints = killed_dir / "checkpoints"
    kill_when(killed, lambda: bool(list(checkpoints.glob("refit-*.pt"))), "the refit's first checkpoint", 180)
    (paused,) = checkpoints.glob("refit-*.pt")
    assert [load_checkpoint(checkpoints / f"lr-{lr}.pt")["epoch"] for lr in ("0.01", "0.001")] == [3, 3]
    assert load_checkpoint(paused)["epoch"] == 1  # interrupted after its first epoch
    assert not (killed_dir / "result.json").exists()

    with pytest.raises(RobustTransferError, match="pass --resume"):  # never overwritten by accident
        transfer(**settings, out_dir=str(killed_dir))
    log = _finish(_start({**settings, "out_dir": str(killed_dir), "resume": True}))
    continued = {line.split(" from ")[0] for line in log.splitlines() if ": continuing after epoch" in line}
    assert continued == {"lr 0.01: continuing after epoch 3 of 3", "lr 0.001: continuing after epoch 3 of 3",  # loaded
                         f"{paused.stem.replace('-', ' ')}: continuing after epoch 1 of 3"}  # e.g. "refit lr 0.01"
    _finish(whole)

    resumed, expected = load_model(killed_dir / "model"), load_model(tmp_path / "whole" / "model")
    assert resumed.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in resumed.state_dict().items())
    record = json.loads((killed_dir / "result.json").read_text())
    reference = json.loads((tmp_path / "whole" / "result.json").read_text())
    assert record["test"] == reference["test"] and record["selection"] == reference["selection"]
    assert {k: v for k, v in record["config"].items() if k != "out_dir"} == {
        k: v for k, v in reference["config"].items() if k != "out_dir"}  # resume is not part of the result
    assert not (killed_dir / "checkpoints").exists()  # removed once the result was written

    again = transfer(**settings, out_dir=str(killed_dir), resume=True)  # finished: returned as it is
    assert again.record.to_dict() == record
