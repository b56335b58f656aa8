"""`load_model`: one entry point for every source of a model, above the loaders that each know one kind.

It chooses between our own files (`model_file`), other tools' files (`foreign`) and zoo names
(`model_dir`); none of those knows of the others.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import RobustTransferError
from .foreign import load_foreign, safetensors_header
from .model_dir import load_zoo_model
from .model_file import (
    EXPORT_FORMAT,
    FORMAT,
    WEIGHTS_SUFFIX,
    check_given_stats,
    load_saved,
    metadata_path,
    weights_path,
)
from .normalization import NormalizedModel

_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".bin", ".safetensors", ".json")


def _own_format(path: Path) -> bool:
    """Whether ``path`` is (part of) a model written by `save_model`: its JSON, or safetensors with our header."""
    if path.suffix == ".json":
        return True
    if not path.name.endswith(WEIGHTS_SUFFIX):
        return False
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
    try:
        document = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(document, dict) and document.get("format") == EXPORT_FORMAT and document.get("file"):
        return meta.with_name(Path(str(document["file"])).name)
    return None


def load_model(
    source: str | os.PathLike[str],
    arch: str | None = None,
    *,
    mean: Any = None,
    std: Any = None,
    options: Mapping[str, Any] | None = None,
    model_dir: str | os.PathLike[str] | None = None,
) -> NormalizedModel:
    """Load a model from a file in any supported format, or by zoo name; on the CPU and in eval mode.

    ``source`` is one of:

    - a model written by `save_model` (the ``.safetensors`` file, its ``.json``, or the name
      without suffix): the SHA-256 is checked against the JSON and the weights must fit exactly;
    - a checkpoint of another tool, read with weights-only loading (nothing pickled runs): the
      robustness library's files as the paper released them, torchvision / timm / RobustBench / ARES
      state dicts (``.pt``, ``.pth``, ``.ckpt``, ``.bin``) and plain safetensors files (see
      `robust_transfer.models.foreign`);
    - a zoo name (``robust-transfer zoo list``): a model registered in the local model directory
      (``model_dir``, else $ROBUST_TRANSFER_MODELS, else ~/.cache/robust-transfer/models), or a
      released file placed there under its released name.

    ``arch`` overrides or supplies the architecture (a registered name, ``timm:NAME`` with
    ``options``, or ``package.module:function``); files that do not name it need it unless their
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
        return load_foreign(path, arch, mean, std, options)
    weights = weights_path(path)
    if weights.is_file():
        model = load_saved(weights, arch)
        check_given_stats(model, mean, std, str(weights))
        return model
    file_like = path.suffix.lower() in _FILE_SUFFIXES
    if len(path.parts) == 1 and not file_like:
        model = load_zoo_model(str(path), arch=arch, mean=mean, std=std, model_dir=model_dir)
        if model is not None:
            return model
    hint = "" if len(path.parts) > 1 or file_like else " (nor a zoo model name; robust-transfer zoo list shows them)"
    raise RobustTransferError(f"model file not found: {path if file_like else weights}{hint}")
