"""Our model file format: safetensors weights plus a JSON of metadata beside them, written atomically.

``NAME.safetensors`` holds the state dict of a `NormalizedModel` (normalisation buffers
included); ``NAME.json`` holds ``{"format": "robust-transfer/1", "spec": {...}, "sha256": ...,
**metadata}``, where ``sha256`` is that of the safetensors file. No pickles are read or written.

This module knows our own files only; other tools' files are `robust_transfer.models.foreign`'s and
`load_model` (`robust_transfer.models.loading`) chooses between them and the zoo.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save
from torch import nn

from ..atomic import atomic_open, atomic_write_text
from ..errors import RobustTransferError
from .builders import class_reference
from .normalization import NormalizedModel
from .registry import CUSTOM, rebuild, resolve_normalization, with_builder
from .spec import ModelSpec
from .state import check_state_dict_fits

FORMAT = "robust-transfer/1"
EXPORT_FORMAT = "robust-transfer-export/1"
"""``format`` of the small JSON written beside an exported file (see `robust_transfer.models.export`)."""
WEIGHTS_SUFFIX = ".safetensors"
RESERVED_KEYS = ("format", "spec", "sha256", "class")


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


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 4 MiB blocks (model files can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DataParallel / DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def save_model(
    model: nn.Module,
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any] | None = None,
    *,
    builder: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model``'s weights to ``path`` (``.safetensors``) and its metadata to the ``.json`` beside it.

    ``model`` must be a `NormalizedModel` (from `create_model` or `with_normalization`; DDP and
    torch.compile wrappers are stripped). ``builder`` (``"package.module:function"``, a function or
    class returning the bare classifier when called with ``options``) makes a model of your own
    reloadable: it is checked to rebuild this exact layout and recorded as ``spec.arch``. ``metadata``
    (JSON-serialisable; keys other than format, spec, sha256 and class) is stored as given; a loaded
    model's ``.metadata`` is not carried over. Each file is written to a temporary file beside it,
    fsynced and renamed (weights first, then the JSON with their checksum), so a crash never leaves a
    torn file under the final name. Returns the weights path.
    """
    model = unwrap(model)
    if not isinstance(model, NormalizedModel):
        raise RobustTransferError(
            f"save_model needs a model with its normalisation in front, got {type(model).__name__}; "
            "wrap it with with_normalization(model, mean, std) or build it with create_model"
        )
    if builder is not None:
        with_builder(model, builder, options)
    extra = dict(metadata or {})
    clash = [k for k in RESERVED_KEYS if k in extra]
    if clash:
        raise RobustTransferError(f"metadata keys {clash} are reserved by the file format; rename them")
    document: dict[str, Any] = {"format": FORMAT, "spec": model.spec.to_dict(), "sha256": "",
                                "class": class_reference(model.model), **extra}
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


def assign_state(model: NormalizedModel, state: dict[str, torch.Tensor], source: str, arch: str) -> NormalizedModel:
    """Fill a model built on the meta device with ``state`` (checked to fit exactly); ``state`` is emptied.

    Every tensor is copied into fresh, aligned memory in the model's dtype (safetensors' buffers
    are not 64-byte aligned, which changes kernel paths; memory-mapped tensors stay unread until
    copied); popping frees each parsed tensor as soon as it is copied.
    """
    check_state_dict_fits(model, state, source, arch)
    expected = model.state_dict()
    ordered: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, reference in expected.items():
        tensor = state.pop(key)
        dtype = reference.dtype if tensor.is_floating_point() else tensor.dtype
        ordered[key] = tensor.to(dtype=dtype, copy=True)
    ordered._metadata = getattr(expected, "_metadata", None)  # type: ignore[attr-defined]  # module versions
    model.load_state_dict(ordered, assign=True)
    _fill_computed_buffers(model)
    return model


def _fill_computed_buffers(model: NormalizedModel) -> None:
    """Give buffers that are not in a state dict (non-persistent: Swin's relative position index and attention
    masks, computed when the model is built) the values a real construction computes."""
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if not left:
        return
    computed = dict(rebuild(model.spec).named_buffers())
    for name in left:
        if name not in computed:  # a programming error (a parameter outside the state dict), not a user mistake
            raise RuntimeError(f"load_model left tensors without data: {left[:4]}")
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_buffer(leaf, computed[name], persistent=False)


def check_given_stats(model: NormalizedModel, mean: Any, std: Any, source: str) -> None:
    """Raise if a user's mean/std differ from those ``model`` carries (they would normalise twice or not at all)."""
    if mean is None and std is None:
        return
    spec = model.spec
    resolve_normalization((spec.mean, spec.std), mean, std, spec.arch, spec.in_channels, source)


def load_saved(
    weights: Path, arch: str | None = None, check_sha256: Callable[[str], None] | None = None
) -> NormalizedModel:
    """Load a model written by `save_model`; ``check_sha256`` may also vet the file's digest (the zoo's registry)."""
    if not weights.is_file():
        raise RobustTransferError(f"model file not found: {weights}")
    document = _read_metadata(weights)
    spec = ModelSpec.from_dict(document.get("spec"))
    payload = weights.read_bytes()  # hash and parse the same bytes: no window for the file to change
    digest = hashlib.sha256(payload).hexdigest()
    if check_sha256 is not None:
        check_sha256(digest)
    if document.get("sha256") != digest:
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
    if arch is not None:
        spec = dataclasses.replace(spec, arch=arch)
    if spec.arch == CUSTOM:
        made = document.get("class") or "your model class"
        raise RobustTransferError(
            f"{weights} holds a custom architecture ({made}) saved without a builder, so it cannot be rebuilt: save it "
            "with save_model(model, path, builder='package.module:function'), naming a function or class that "
            f"returns the bare model (builder='{made}' if it takes no arguments), or build it yourself, wrap it "
            "with with_normalization and call .load_state_dict(safetensors.torch.load_file(path))"
        )
    with torch.device("meta"):
        model = rebuild(spec)
    assign_state(model, state, str(weights), spec.arch)
    model.metadata = document
    return model.eval()
