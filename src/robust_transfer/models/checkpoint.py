"""Our model file format: safetensors weights plus a JSON of metadata beside them, written atomically.

``NAME.safetensors`` holds the state dict of a `NormalizedModel` (normalisation buffers
included); ``NAME.json`` holds ``{"format": "robust-transfer/1", "spec": {...}, "sha256": ...,
**metadata}``, where ``sha256`` is that of the safetensors file. No pickles are read or written.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save
from torch import nn

from ..atomic import atomic_open, atomic_write_text
from ..errors import RobustTransferError
from .normalization import NormalizedModel
from .registry import CUSTOM, create_model
from .spec import ModelSpec

FORMAT = "robust-transfer/1"
WEIGHTS_SUFFIX = ".safetensors"
RESERVED_KEYS = ("format", "spec", "sha256")
_SHOWN_KEYS = 4


def weights_path(path: str | os.PathLike[str]) -> Path:
    """The weights file for ``path``: ``.safetensors`` is appended unless it is already there."""
    p = Path(path)
    if p.name.endswith(WEIGHTS_SUFFIX):
        return p
    if p.suffix == ".json":
        return p.with_suffix(WEIGHTS_SUFFIX)
    return p.with_name(p.name + WEIGHTS_SUFFIX)


def metadata_path(weights: Path) -> Path:
    """The JSON beside a weights file: same stem, ``.json``."""
    return weights.with_suffix(".json")


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DataParallel / DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def save_model(
    model: nn.Module, path: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model``'s weights to ``path`` (``.safetensors``) and its metadata to the ``.json`` beside it.

    ``model`` must be a `NormalizedModel` (from `create_model` or `with_normalization`; DDP and
    torch.compile wrappers are stripped). ``metadata`` (JSON-serialisable; keys other than
    format, spec and sha256) is stored as given; a loaded model's ``.metadata`` is not carried
    over. Each file is written to a temporary file beside it, fsynced and renamed (weights
    first, then the JSON with their checksum), so a crash never leaves a torn file under the
    final name. Returns the weights path.
    """
    model = _unwrap(model)
    if not isinstance(model, NormalizedModel):
        raise RobustTransferError(
            f"save_model needs a model with its normalisation in front, got {type(model).__name__}; "
            "wrap it with with_normalization(model, mean, std) or build it with create_model"
        )
    extra = dict(metadata or {})
    clash = [k for k in RESERVED_KEYS if k in extra]
    if clash:
        raise RobustTransferError(f"metadata keys {clash} are reserved by the file format; rename them")
    document: dict[str, Any] = {"format": FORMAT, "spec": model.spec.to_dict(), "sha256": "", **extra}
    try:
        json.dumps(document)
    except (TypeError, ValueError) as exc:
        raise RobustTransferError(
            f"metadata must be JSON-serialisable (numbers, strings, lists, dicts): {exc}"
        ) from None

    weights = weights_path(path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    header = {"format": FORMAT, "spec": json.dumps(model.spec.to_dict())}
    payload = save(tensors, metadata=header)
    document["sha256"] = hashlib.sha256(payload).hexdigest()
    with atomic_open(weights, "wb") as handle:
        handle.write(payload)
    del payload
    atomic_write_text(metadata_path(weights), json.dumps(document, indent=2) + "\n")
    return weights


def _read_metadata(weights: Path) -> dict[str, Any]:
    meta = metadata_path(weights)
    if not meta.is_file():
        raise RobustTransferError(
            f"metadata file {meta} not found beside {weights}; "
            "save_model writes both files, keep them together"
        )
    try:
        document = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RobustTransferError(f"cannot read model metadata {meta}: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else None
        raise RobustTransferError(
            f"{meta} is not a robust-transfer model file (format {found!r}, expected {FORMAT!r})"
        )
    return document


def _few(keys: list[str]) -> str:
    """A few keys spread evenly over the list (first and last included), and how many there are."""
    if len(keys) <= _SHOWN_KEYS:
        return ", ".join(keys)
    picks = sorted({round(i * (len(keys) - 1) / (_SHOWN_KEYS - 1)) for i in range(_SHOWN_KEYS)})
    return ", ".join(keys[i] for i in picks) + f" ({len(keys)} in all)"


def check_state_dict_fits(
    model: nn.Module, state: Mapping[str, torch.Tensor], source: str, arch: str
) -> None:
    """Raise a `RobustTransferError` naming a few missing, unexpected and wrong-shape keys, if any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = sorted(k for k in state if k not in expected)
    wrong = [
        f"{k} (file {list(state[k].shape)}, model {list(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or wrong):
        return
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if wrong:
        problems.append(f"wrong shapes: {_few(wrong)}")
    raise RobustTransferError(
        f"the weights in {source} do not fit architecture {arch!r}; "
        + "; ".join(problems)
        + ". Pass the architecture the file was saved from (arch=...) or check its JSON spec"
    )


def load_model(path: str | os.PathLike[str], arch: str | None = None) -> NormalizedModel:
    """Load a model written by `save_model`, on the CPU and in eval mode.

    ``path`` is the ``.safetensors`` file (or its ``.json``, or the name without suffix).
    ``arch`` overrides the architecture recorded in the JSON. The file's SHA-256 is checked
    against the JSON, and the weights must fit the architecture exactly. The returned model has
    a ``.metadata`` dict with the whole JSON (format, spec, sha256 and the saved metadata).
    """
    weights = weights_path(path)
    if not weights.is_file():
        raise RobustTransferError(f"model file not found: {weights}")
    document = _read_metadata(weights)
    spec = ModelSpec.from_dict(document.get("spec"))
    payload = weights.read_bytes()  # hash and parse the same bytes: no window for the file to change
    if document.get("sha256") != hashlib.sha256(payload).hexdigest():
        raise RobustTransferError(
            f"{weights} does not match the checksum in {metadata_path(weights)}: it was changed or truncated "
            "after it was saved; copy or save it again"
        )
    try:
        state = load(payload)
    except Exception as exc:  # safetensors raises its own error types for corrupt headers and data
        raise RobustTransferError(
            f"cannot read {weights} as safetensors, the file is corrupt: {exc}"
        ) from None
    del payload
    arch = spec.arch if arch is None else arch
    if arch == CUSTOM:
        raise RobustTransferError(
            f"{weights} holds a custom architecture that cannot be rebuilt by name; build the model, "
            "wrap it with with_normalization and load the weights with safetensors.torch.load_file, "
            "or pass arch=..."
        )
    with torch.device("meta"):
        model = create_model(arch, spec.num_classes or 1, spec.in_channels, spec.mean, spec.std)
    check_state_dict_fits(model, state, str(weights), arch)
    expected = model.state_dict()
    # Fresh, aligned copies (safetensors' buffers are not 64-byte aligned, which changes kernel paths),
    # cast to the model's dtype; popping frees each parsed tensor as soon as it is copied.
    ordered: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, reference in expected.items():
        tensor = state.pop(key)
        dtype = reference.dtype if tensor.is_floating_point() else tensor.dtype
        ordered[key] = tensor.to(dtype=dtype, copy=True)
    ordered._metadata = getattr(expected, "_metadata", None)  # type: ignore[attr-defined]  # module versions
    model.load_state_dict(ordered, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a programming error (a buffer outside the state dict), not a user mistake
        raise RuntimeError(f"load_model left tensors without data: {left[:_SHOWN_KEYS]}")
    model.metadata = document
    return model.eval()
