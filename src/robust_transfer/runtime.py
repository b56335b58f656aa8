"""Where and how fast we compute: device choice, bf16 autocast, channels_last, allocator tuning, loader workers."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import shutil
import sys

import torch
from torch import nn

from .errors import RobustTransferError

PRECISIONS = ("auto", "bf16", "fp32")

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.cache
def tune_malloc() -> bool:
    """Stop glibc from returning large activation buffers to the OS on every step.

    Each training step frees and re-allocates the same big buffers; by default glibc serves
    them with mmap and unmaps them again, which costs about a quarter of an fp32 step on CPU.
    Returns True when the settings were applied (glibc only; a no-op elsewhere).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok_mmap = libc.mallopt(_M_MMAP_MAX, 0)
        ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        return False
    return bool(ok_mmap and ok_trim)


MAX_AUTO_WORKERS = 8


def loader_workers(requested: int | None) -> int:
    """Data-loading workers per training process: ``requested``, or by default the cores this process may use
    shared among the training processes on this machine (torchrun's LOCAL_WORLD_SIZE), at most 8."""
    if requested is not None:
        return requested
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(MAX_AUTO_WORKERS, len(os.sched_getaffinity(0)) // local_processes))


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; anything else is passed to torch."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise RobustTransferError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RobustTransferError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return resolved


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmuls (AMX or AVX512-BF16), where autocast pays off."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn ``"auto"`` into ``"bf16"`` where the hardware runs it fast, else ``"fp32"``."""
    if precision not in PRECISIONS:
        raise RobustTransferError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``"bf16"``, nothing for ``"fp32"`` (the reference path)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def uses_channels_last(device: torch.device) -> bool:
    """channels_last is the layout oneDNN (CPU) and cuDNN (GPU) run convolutions in, at any precision: fp32
    training steps of ResNets 1.16-1.32x faster than NCHW on a CPU without fast bf16, a ViT's the same
    (docs/BENCHMARKS.md). NCHW models and inputs still work; the layout changes no result beyond rounding."""
    return device.type in ("cpu", "cuda")


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """Move a model to ``device`` in the memory layout its convolutions run fastest in there."""
    model = model.to(device)
    if uses_channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    return model


def check_can_compile(device: torch.device) -> None:
    """Raise a one-line error when ``torch.compile`` cannot work here: on the CPU, inductor builds its kernels
    with a C++ compiler (``$CXX``, g++ or clang++); better said before the data loads than mid-step."""
    if device.type == "cpu" and not any(shutil.which(name) for name in (os.environ.get("CXX"), "g++", "clang++")
                                        if name):
        raise RobustTransferError("--compile on the CPU needs a C++ compiler (g++ or clang++, or $CXX): install one, "
                                  "or run without --compile")


def prepare_batch(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move an image batch to ``device`` in the same layout as the model."""
    x = x.to(device, non_blocking=True)
    if x.dim() == 4 and uses_channels_last(device):
        x = x.contiguous(memory_format=torch.channels_last)
    return x
