"""The local model directory: models registered in our format (``registry.json``, each with its SHA-256) and
the paper's released files placed there under their released names.

The directory is ``$ROBUST_TRANSFER_MODELS``, default ``~/.cache/robust-transfer/models``; loading a
registered model checks its digest.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text, file_lock
from ..errors import RobustTransferError
from .foreign import load_foreign
from .manifest import ZooEntry, zoo_entry
from .model_file import check_given_stats, load_saved
from .normalization import NormalizedModel
from .spec import Stats

ENV_VAR = "ROBUST_TRANSFER_MODELS"
DEFAULT_DIR = Path("~/.cache/robust-transfer/models")
REGISTRY_NAME = "registry.json"
REGISTRY_FORMAT = "robust-transfer-zoo/1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
_FILE_SUFFIXES = (".json", ".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".tmp")

def model_directory(model_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local model directory: ``model_dir``, else $ROBUST_TRANSFER_MODELS, else ~/.cache/robust-transfer/models."""
    chosen = model_dir if model_dir is not None else os.environ.get(ENV_VAR) or DEFAULT_DIR
    return Path(chosen).expanduser()


def read_registry(model_dir: str | os.PathLike[str] | None = None) -> dict[str, dict[str, Any]]:
    """The registered models of a model directory, by name (empty when there is no registry yet)."""
    path = model_directory(model_dir) / REGISTRY_NAME
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RobustTransferError(
            f"the zoo registry {path} cannot be read ({exc}); restore it, or delete it and import the models again"
        ) from None
    if not isinstance(document, dict) or document.get("format") != REGISTRY_FORMAT:
        raise RobustTransferError(
            f"{path} is not a robust-transfer zoo registry (format {REGISTRY_FORMAT!r} expected); move it away"
        )
    models = document.get("models")
    return dict(models) if isinstance(models, dict) else {}


def write_registry(directory: Path, models: dict[str, dict[str, Any]]) -> None:
    document = {"format": REGISTRY_FORMAT, "models": dict(sorted(models.items()))}
    atomic_write_text(directory / REGISTRY_NAME, json.dumps(document, indent=2) + "\n")


def registry_lock(directory: Path):
    """Serialise registry updates between processes."""
    return file_lock(directory / ".registry.lock")


def check_name(name: str) -> str:
    """A registrable model name: letters, digits and ``_ . + -``, not a file name and not ``registry``."""
    if not isinstance(name, str) or not _NAME.match(name) or name.lower().endswith(_FILE_SUFFIXES) or (
        name == Path(REGISTRY_NAME).stem
    ):
        raise RobustTransferError(
            f"model name {name!r} is not allowed: use letters, digits and _ . + - (up to 128), without a file "
            "suffix such as .ckpt, e.g. resnet50_l2_eps3 or my_model"
        )
    return name


def status(name: str, model_dir: str | os.PathLike[str] | None = None,
           registry: dict[str, dict[str, Any]] | None = None) -> str:
    """``imported`` (registered in our format), ``released file`` (the released file is in place) or ``absent``."""
    directory = model_directory(model_dir)
    registry = read_registry(directory) if registry is None else registry
    if name in registry:
        return "imported"
    entry = zoo_entry(name)
    if entry is not None and (directory / entry.filename).is_file():
        return "released file"
    return "absent"


def placement_error(entry: ZooEntry, directory: Path) -> RobustTransferError:
    return RobustTransferError(
        f"zoo model {entry.name} is not in the local model directory {directory}: place the released file "
        f"{entry.filename} ({entry.source}) at {directory / entry.filename}, or convert a copy with: "
        f"robust-transfer zoo import FILE --name {entry.name}"
    )


def _registry_check(name: str, record: dict[str, Any], path: Path):
    expected = record.get("sha256")

    def check(digest: str) -> None:
        if digest != expected:
            raise RobustTransferError(
                f"{path} does not match the sha256 recorded when {name} was registered ({str(expected)[:16]}..., "
                f"now {digest[:16]}...): it was changed after import; import the original again with: "
                f"robust-transfer zoo import FILE --name {name} --force"
            )

    return check


def load_zoo_model(
    name: str,
    arch: str | None = None,
    mean: Stats | None = None,
    std: Stats | None = None,
    model_dir: str | os.PathLike[str] | None = None,
) -> NormalizedModel | None:
    """Load a registered model or a released file placed in the model directory; None if ``name`` is unknown.

    A manifest model that is neither registered nor in place raises an error saying which file to
    put where.
    """
    directory = model_directory(model_dir)
    registry = read_registry(directory)
    entry = zoo_entry(name)
    key = name if name in registry else (entry.name if entry is not None and entry.name in registry else None)
    if key is not None:
        record = registry[key]
        path = directory / str(record.get("file", ""))
        if not record.get("file") or not path.is_file():
            raise RobustTransferError(
                f"{key} is registered in {directory} but its file {path} is missing; import it again with: "
                f"robust-transfer zoo import FILE --name {key} --force"
            )
        model = load_saved(path, arch, _registry_check(key, record, path))
        check_given_stats(model, mean, std, str(path))
        model.metadata["zoo_name"] = key
        return model
    if entry is None:
        return None
    released = directory / entry.filename
    if not released.is_file():
        raise placement_error(entry, directory)
    if arch is not None and arch != entry.arch:
        raise RobustTransferError(f"{entry.name} is a {entry.arch} model; leave arch out or pass {entry.arch!r}")
    return load_released(entry, released, mean, std)


def load_released(entry: ZooEntry, path: Path, mean: Stats | None = None, std: Stats | None = None
                  ) -> NormalizedModel:
    """A manifest model's file as its publishers saved it: the entry's architecture, options and normalisation
    (unless the file carries its own), with the entry's facts in ``.metadata``."""
    model = load_foreign(path, entry.arch, mean, std, entry.options, carried=entry.normalization)
    model.metadata.update(entry.metadata())
    model.metadata["zoo_name"] = entry.name
    return model

