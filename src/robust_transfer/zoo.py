"""The model zoo's commands: import a file into the local model directory, list and describe what is known.

The manifest (`robust_transfer.models.manifest`) lists the paper's released models and today's robust
ImageNet models; the local model directory (`robust_transfer.models.model_dir`) holds what the user
imported, each registered with its SHA-256. Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .errors import RobustTransferError
from .models.loading import load_model
from .models.manifest import MANIFEST, PAPER, ZooEntry, zoo_entry
from .models.model_dir import (
    ENV_VAR,
    REGISTRY_NAME,
    check_name,
    load_released,
    load_zoo_model,
    model_directory,
    placement_error,
    read_registry,
    registry_lock,
    status,
    write_registry,
)
from .models.model_file import RESERVED_KEYS, save_model, sha256_file, weights_path
from .models.spec import Stats

__all__ = ["ENV_VAR", "MANIFEST", "PAPER", "REGISTRY_NAME", "ZooEntry", "describe", "import_model", "list_models",
           "load_zoo_model", "model_directory", "read_registry", "status", "zoo_entry"]


def import_model(
    source: str | os.PathLike[str],
    name: str,
    model_dir: str | os.PathLike[str] | None = None,
    arch: str | None = None,
    mean: Stats | None = None,
    std: Stats | None = None,
    force: bool = False,
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Convert any supported model file into our format in the model directory and register it as ``name``.

    ``source`` is a file, or the zoo name of a released file placed in the model directory. For a
    name of the manifest (the paper's models, RobustBench's, ARES's) the architecture, normalisation,
    preprocessing, threat model and published accuracy are taken from the manifest; for any other name
    ``arch`` (``timm:NAME`` with ``options``, a builder) names the architecture when the file does not.
    Returns the registry record (file, sha256, arch, source and its sha256, ...) plus ``path`` and
    ``arch_inferred``. An existing name is replaced only with ``force``.
    """
    check_name(name)
    directory = model_directory(model_dir)
    entry = MANIFEST.get(name)
    if entry is not None and arch is not None and arch != entry.arch:
        whose = "the paper's" if entry.source == PAPER else "a manifest"
        raise RobustTransferError(f"{name} is {whose} {entry.arch} model; leave --arch out or pass {entry.arch}")
    if not force and name in read_registry(directory):
        raise RobustTransferError(
            f"{name} is already registered in {directory}; pass --force (force=True) to replace it"
        )
    source_path = Path(source)
    if not source_path.is_file() and weights_path(source_path).is_file():
        source_path = weights_path(source_path)
    released = zoo_entry(str(source))
    if not source_path.is_file() and released is not None and (directory / released.filename).is_file():
        source_path = directory / released.filename  # "zoo import resnet50_l2_eps3 --name ...": the placed file
    if not source_path.is_file():
        raise RobustTransferError(f"model file not found: {source_path}")
    if entry is not None:
        model = load_released(entry, source_path, mean, std)
    else:
        model = load_model(source_path, arch, mean=mean, std=std, options=options)
    metadata = {k: v for k, v in model.metadata.items() if k not in RESERVED_KEYS and k != "zoo_name"}
    if entry is not None:
        metadata.update(entry.metadata())
    source_sha256 = sha256_file(source_path)
    metadata["zoo"] = {**metadata.get("zoo", {}), "name": name, "imported_from": str(source_path.resolve()),
                       "source_sha256": source_sha256}
    with registry_lock(directory):
        registry = read_registry(directory)
        if not force and name in registry:
            raise RobustTransferError(f"{name} was registered meanwhile; pass --force to replace it")
        weights = save_model(model, directory / name, metadata)
        document = json.loads(weights.with_suffix(".json").read_text(encoding="utf-8"))
        spec = model.spec
        record = {
            "file": weights.name,
            "sha256": document["sha256"],
            "arch": spec.arch,
            "num_classes": spec.num_classes,
            "threat": metadata.get("threat"),
            "paper_model": entry is not None,
            "source": str(source_path.resolve()),
            "source_format": model.metadata.get("source_format", "robust-transfer"),
            "source_sha256": source_sha256,
            "registered": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        registry[name] = record
        write_registry(directory, registry)
    return {"name": name, "path": str(weights), "arch_inferred": bool(model.metadata.get("arch_inferred")),
            "normalization": model.metadata.get("normalization", "file"), "mean": list(spec.mean),
            "std": list(spec.std), **record}


def list_models(model_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """One row per manifest model, then per other registered model: name, arch, threat, top-1, local status."""
    directory = model_directory(model_dir)
    registry = read_registry(directory)
    rows = []
    for entry in MANIFEST.values():
        rows.append({"name": entry.name, "arch": entry.arch, "norm": entry.norm, "eps": entry.eps,
                     "threat": entry.threat, "clean_top1": entry.clean_top1, "robust_top1": entry.robust_top1,
                     "source": entry.source, "paper_model": True,
                     "status": status(entry.name, directory, registry)})
    for name, record in registry.items():
        if name in MANIFEST:
            continue
        threat = record.get("threat") or {}
        eps = threat.get("eps")
        rows.append({"name": name, "arch": record.get("arch"), "norm": threat.get("norm"), "eps": eps,
                     "threat": f"{threat.get('norm')} eps {eps:g}" if isinstance(eps, (int, float)) else "-",
                     "clean_top1": None, "paper_model": False, "status": "imported"})
    return rows


def describe(name: str, model_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Everything known about ``name``: manifest facts, where its file goes or is, and its registry record."""
    directory = model_directory(model_dir)
    registry = read_registry(directory)
    entry = zoo_entry(name)
    key = name if name in registry else (entry.name if entry is not None and entry.name in registry else None)
    if entry is None and key is None:
        raise RobustTransferError(
            f"{name} is neither one of the paper's models nor registered in {directory}; "
            "robust-transfer zoo list shows the names"
        )
    info: dict[str, Any] = {"name": entry.name if entry is not None else name, "model_dir": str(directory)}
    if entry is not None:
        info.update({k: v for k, v in asdict(entry).items() if k not in ("name", "normalization")})
        info["normalization"] = {"mean": list(entry.normalization[0]), "std": list(entry.normalization[1])}
        info["threat"] = entry.threat
        info["released_path"] = str(directory / entry.filename)
        info["paper"] = entry.source
    info["status"] = status(info["name"], directory, registry)
    if key is not None:
        record = registry[key]
        info["registered"] = {**record, "path": str(directory / str(record.get("file", "")))}
        meta = weights_path(directory / str(record.get("file", ""))).with_suffix(".json")
        with contextlib.suppress(OSError, json.JSONDecodeError, UnicodeDecodeError):
            document = json.loads(meta.read_text(encoding="utf-8"))
            info["metadata"] = {k: v for k, v in document.items() if k not in ("format", "sha256")}
    elif entry is not None and info["status"] == "absent":
        info["todo"] = str(placement_error(entry, directory))
    return info
