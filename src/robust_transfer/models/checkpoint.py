"""Our model file format: safetensors weights plus a JSON of metadata beside them, written atomically.

``NAME.safetensors`` holds the state dict of a `NormalizedModel` (normalisation buffers
included); ``NAME.json`` holds ``{"format": "robust-transfer/1", "spec": {...}, "sha256": ...,
**metadata}``, where ``sha256`` is that of the safetensors file. No pickles are read or written.

`load_model` also reads other tools' checkpoints (through `robust_transfer.models.legacy`, with
weights-only loading) and zoo names (through `robust_transfer.zoo`).
"""

from __future__ import annotations

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
from .normalization import NormalizedModel
from .registry import CUSTOM, create_model
from .spec import ModelSpec

FORMAT = "robust-transfer/1"
WEIGHTS_SUFFIX = ".safetensors"
RESERVED_KEYS = ("format", "spec", "sha256")
_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".bin", ".safetensors", ".json")
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


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 4 MiB blocks (model files can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a programming error (a buffer outside the state dict), not a user mistake
        raise RuntimeError(f"load_model left tensors without data: {left[:_SHOWN_KEYS]}")
    return model


def _own_format(path: Path) -> bool:
    """Whether ``path`` is (part of) a model written by `save_model`: its JSON, or safetensors with our header."""
    if path.suffix == ".json":
        return True
    if not path.name.endswith(WEIGHTS_SUFFIX):
        return False
    from .legacy import safetensors_header

    header = (safetensors_header(path) or {}).get("__metadata__") or {}
    if header.get("format") == FORMAT:
        return True
    meta = metadata_path(path)
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def _exported_file(meta: Path) -> Path | None:
    """The weights file named by an export's JSON (see `robust_transfer.models.export`), or None."""
    from .legacy import EXPORT_FORMAT

    try:
        document = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(document, dict) and document.get("format") == EXPORT_FORMAT and document.get("file"):
        return meta.with_name(Path(str(document["file"])).name)
    return None


def check_given_stats(model: NormalizedModel, mean: Any, std: Any, source: str) -> None:
    """Raise if a user's mean/std differ from those ``model`` carries (they would normalise twice or not at all)."""
    if mean is None and std is None:
        return
    from .legacy import resolve_normalization

    spec = model.spec
    resolve_normalization((spec.mean, spec.std), mean, std, spec.arch, spec.in_channels, source)


def load_model(
    source: str | os.PathLike[str],
    arch: str | None = None,
    *,
    mean: Any = None,
    std: Any = None,
    model_dir: str | os.PathLike[str] | None = None,
) -> NormalizedModel:
    """Load a model from a file in any supported format, or by zoo name; on the CPU and in eval mode.

    ``source`` is one of:

    - a model written by `save_model` (the ``.safetensors`` file, its ``.json``, or the name
      without suffix): the SHA-256 is checked against the JSON and the weights must fit exactly;
    - a checkpoint of another tool, read with weights-only loading (nothing pickled runs): the
      robustness library's files as the paper released them, torchvision / timm / RobustBench
      state dicts (``.pt``, ``.pth``, ``.ckpt``, ``.bin``) and plain safetensors files (see
      `robust_transfer.models.legacy`);
    - a zoo name (``robust-transfer zoo list``): a model registered in the local model directory
      (``model_dir``, else $ROBUST_TRANSFER_MODELS, else ~/.cache/robust-transfer/models), or one of
      the paper's released files placed there under its released name.

    ``arch`` overrides or supplies the architecture; files that do not name it need it unless their
    weights identify exactly one registered architecture (then it is inferred, and
    ``metadata["arch_inferred"]`` says so). ``mean``/``std`` give the normalisation a plain state
    dict expects (default: the architecture's); for files that carry their own they must agree.
    The returned model has a ``.metadata`` dict (for our format, the whole JSON).
    """
    path = Path(source)
    if path.is_file() and path.suffix == ".json":
        exported = _exported_file(path)
        if exported is not None:
            path = exported
    if path.is_file():
        if _own_format(path):
            model = load_saved(weights_path(path), arch)
            check_given_stats(model, mean, std, str(path))
            return model
        from .legacy import load_foreign

        return load_foreign(path, arch, mean, std)
    weights = weights_path(path)
    if weights.is_file():
        model = load_saved(weights, arch)
        check_given_stats(model, mean, std, str(weights))
        return model
    file_like = path.suffix.lower() in _FILE_SUFFIXES
    if len(path.parts) == 1 and not file_like:
        from ..zoo import load_zoo_model

        model = load_zoo_model(str(path), arch=arch, mean=mean, std=std, model_dir=model_dir)
        if model is not None:
            return model
    hint = "" if len(path.parts) > 1 or file_like else " (nor a zoo model name; robust-transfer zoo list shows them)"
    raise RobustTransferError(f"model file not found: {path if file_like else weights}{hint}")


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
    arch = spec.arch if arch is None else arch
    if arch == CUSTOM:
        raise RobustTransferError(
            f"{weights} holds a custom architecture that cannot be rebuilt by name; build the model, "
            "wrap it with with_normalization and load the weights with safetensors.torch.load_file, "
            "or pass arch=..."
        )
    with torch.device("meta"):
        model = create_model(arch, spec.num_classes or 1, spec.in_channels, spec.mean, spec.std,
                             head_hidden=spec.head_hidden)
    assign_state(model, state, str(weights), arch)
    model.metadata = document
    return model.eval()
