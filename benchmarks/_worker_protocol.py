"""JSON-lines protocol between benchmarks/pgd_training_step.py and its contender subprocesses.

Some contenders must not share the driver's process: MadryLab robustness lives in its own virtual
environment, and the plain PyTorch loop must not inherit the allocator tuning that our engine
applies process-wide (glibc mallopt cannot be undone). Each such contender runs in a worker that
reads one JSON command per line on stdin and answers one JSON line on the protocol stream.

Commands:
  {"cmd": "first", "out": PATH}         one training step from the initial weights; saves the
                                        adversarial batch to PATH (torch.save) and answers its loss
  {"cmd": "round", "warmup": W, "steps": N}
                                        W untimed then N timed steps; answers per-step wall and
                                        CPU (process_time, all threads) seconds and losses
  {"cmd": "quit"}

This file needs only the standard library and torch, so it imports in every venv.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable

import torch

# step() -> (loss, adversarial batch); the loss is a Python float (forcing completion).
StepFn = Callable[[], "tuple[float, torch.Tensor]"]


def protocol_stream():
    """Keep the real stdout for protocol lines and send everything else printed to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


def load_init(path: str) -> dict:
    """The driver's initial state: batch, labels, weights and attack settings (tensors only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def serve(step: StepFn, proto, info: dict) -> None:
    """Answer commands until "quit" or end of input. ``info`` is sent once as a greeting."""
    proto.write(json.dumps({"ready": True, **info}) + "\n")
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        msg = json.loads(line)
        try:
            if msg["cmd"] == "quit":
                break
            if msg["cmd"] == "first":
                t0 = time.perf_counter()
                loss, x_adv = step()
                seconds = time.perf_counter() - t0
                torch.save(x_adv.detach().float().contiguous().cpu(), msg["out"])
                reply = {"loss": loss, "seconds": seconds}
            elif msg["cmd"] == "round":
                for _ in range(int(msg["warmup"])):
                    step()
                times, cpu_times, losses = [], [], []
                for _ in range(int(msg["steps"])):
                    t0, c0 = time.perf_counter(), time.process_time()
                    loss, _x = step()
                    times.append(time.perf_counter() - t0)
                    cpu_times.append(time.process_time() - c0)
                    losses.append(loss)
                reply = {"times": times, "cpu_times": cpu_times, "losses": losses}
            else:
                reply = {"error": f"unknown command {msg['cmd']!r}"}
        except Exception:  # report to the driver rather than dying silently
            reply = {"error": traceback.format_exc()}
        proto.write(json.dumps(reply) + "\n")
