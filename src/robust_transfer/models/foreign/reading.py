"""Reading another tool's checkpoint file without running anything in it, and finding its state dict.

torch files go through ``torch.load(..., weights_only=True)`` (tensors and plain containers only),
safetensors files through safetensors; a file that asks for any other pickled object is refused
before anything in it runs, with the command that converts it in a trusted environment.
"""

from __future__ import annotations

import functools
import json
import pickle
import pickletools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from ...errors import RobustTransferError

CONTAINER_KEYS = ("model", "state_dict", "model_state_dict")
"""Entries of a checkpoint dict that may hold the state dict, in the order they are tried."""

_ZIP_MAGIC = b"PK\x03\x04"
# torch.save's pre-1.6 format opens with a protocol-2 pickle of this magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"

CONVERT_COMMAND = (
    "python -c \"import sys,torch; c=torch.load(sys.argv[1],map_location='cpu',weights_only=False); "
    "s=c.get('model',c.get('state_dict',c)) if isinstance(c,dict) else c.state_dict(); "
    "torch.save({k:v for k,v in s.items() if torch.is_tensor(v)},sys.argv[2])\" IN OUT"
)
"""Run only in a trusted environment (it unpickles the file): keeps the tensors, drops everything else."""


def sniff(path: Path) -> str:
    """What kind of file ``path`` is: zip (torch.save), legacy (old torch.save), safetensors, pickle or unknown."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise RobustTransferError(f"cannot read {path}: {exc.strerror or exc}") from None
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(_LEGACY_MAGIC):
        return "legacy"
    if safetensors_header(path) is not None:
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def safetensors_header(path: Path) -> dict[str, Any] | None:
    """The JSON header of a safetensors file, or None when ``path`` does not start like one."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                return None
            length = int.from_bytes(prefix, "little")
            if not 2 <= length <= min(size - 8, 100_000_000):
                return None
            text = handle.read(length)
    except OSError:
        return None
    if not text.startswith(b"{"):
        return None
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return header if isinstance(header, dict) else None


def _pickle_globals(path: Path, limit: int = 3, max_ops: int = 1_000_000) -> list[str]:
    """Globals a raw pickle asks for, found by parsing its opcodes (nothing is executed); unusual ones first."""
    names: list[str] = []
    strings: list[str] = []
    try:
        with open(path, "rb") as handle:
            for count, (opcode, arg, _) in enumerate(pickletools.genops(handle)):
                if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
                    strings = [*strings[-1:], str(arg)]
                elif opcode.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) == 2:
                    names.append(".".join(strings))
                if count >= max_ops:
                    break
    except Exception:  # a torn pickle: report what was found before the tear
        pass
    unique = list(dict.fromkeys(names))
    ordinary = [n for n in unique if n.startswith(("torch.", "collections.OrderedDict"))]
    return ([n for n in unique if n not in ordinary] + ordinary)[:limit]


def _refused(path: Path, what: str) -> RobustTransferError:
    return RobustTransferError(
        f"{path} {what}, so it was refused and nothing in it ran (only tensors and plain containers are "
        f"loaded). If you trust the file, convert it in a trusted environment with: {CONVERT_COMMAND} "
        "(files saved with dill need dill installed there), then load OUT"
    )


def _corrupt(path: Path, detail: str) -> RobustTransferError:
    return RobustTransferError(
        f"{path} is truncated or corrupt ({detail}): download or copy it again"
    )


@functools.lru_cache(maxsize=1)
def _numpy_safe_globals() -> list[Any]:
    """numpy's array and scalar reconstructors (data only, no code) under both module spellings.

    Checkpoints often hold accuracies or schedules as numpy scalars; these rebuild them from raw
    bytes. An object array's elements still go through the weights-only checks.
    """
    core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(core.multiarray.scalar, f"{module}.scalar"),
                    (core.multiarray._reconstruct, f"{module}._reconstruct")]
    kinds = (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_)
    allowed += [type(np.dtype(kind)) for kind in kinds]
    return allowed


def read_checkpoint(path: str | Path) -> tuple[Any, str]:
    """Load the object in a torch or safetensors file without running any pickled code.

    Returns ``(object, kind)`` where kind is ``"torch"`` or ``"safetensors"``. Tensors of zip-format
    torch files and of safetensors files are memory-mapped, so a checkpoint's optimizer state costs
    no memory unless it is touched.
    """
    path = Path(path)
    if not path.is_file():
        raise RobustTransferError(f"model file not found: {path}")
    kind = sniff(path)
    if kind == "safetensors":
        try:
            return load_file(str(path)), "safetensors"
        except Exception as exc:  # safetensors raises its own error types for torn headers and data
            raise _corrupt(path, f"safetensors: {exc}") from None
    if kind == "pickle":
        found = _pickle_globals(path)
        asks = f" (it asks for {', '.join(found)})" if found else ""
        raise _refused(path, f"is a raw Python pickle, not a torch.save file{asks}: it needs arbitrary objects")
    if kind == "unknown":
        size = path.stat().st_size
        raise RobustTransferError(
            f"{path} ({size} bytes) is neither a torch.save checkpoint nor a safetensors file: it is truncated, "
            "corrupt or of another kind; download or copy it again"
        )
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except pickle.UnpicklingError as exc:
        text = str(exc)
        match = re.search(r"GLOBAL ([\w.]+)", text)
        if match:
            raise _refused(path, f"needs arbitrary pickled objects (it asks for {match.group(1)})") from None
        operand = re.search(r"Unsupported operand \d+", text)
        detail = operand.group(0) if operand else text.strip().splitlines()[-1][:200]
        raise _refused(path, f"cannot be read with weights-only loading ({detail}); it is corrupt or needs "
                       "arbitrary pickled objects") from None
    except RuntimeError as exc:
        text = str(exc).strip()
        first = re.split(r"(?<=[a-z])\. ", text.splitlines()[0])[0][:200] if text else type(exc).__name__
        raise _corrupt(path, first) from None
    except (EOFError, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise _corrupt(path, f"{type(exc).__name__}: {exc}"[:200]) from None
    return obj, "torch"


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def pick_state_dict(obj: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], str | None]:
    """The state dict inside a checkpoint: ``(state, other entries, container key or None)``."""
    if isinstance(obj, Mapping):
        for key in CONTAINER_KEYS:
            if key in obj and _is_tensor_dict(obj[key]):
                return dict(obj[key]), {k: v for k, v in obj.items() if k != key}, key
        if _is_tensor_dict(obj):
            return dict(obj), {}, None
        shown = ", ".join(repr(k) for k in list(obj)[:8])
        raise RobustTransferError(
            f"{source} holds no state dict: expected a dict of tensors, or a dict whose 'model' or 'state_dict' "
            f"entry is one; it has keys {shown}"
        )
    raise RobustTransferError(
        f"{source} holds a {type(obj).__name__}, not a state dict (a dict of tensors); save model.state_dict()"
    )

