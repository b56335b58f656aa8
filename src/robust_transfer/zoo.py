"""The model zoo: the paper's released models (a manifest) and a local model directory with a registry.

The manifest lists every ImageNet model Salman et al. (2020) released, with its architecture,
threat model, eps, the file name it was released under and, where we have it, its reported clean
ImageNet top-1. Nothing is downloaded: the user places a released file in the model directory
(``$ROBUST_TRANSFER_MODELS``, default ``~/.cache/robust-transfer/models``) under its released name,
or converts any supported file into our format there with `import_model` (``robust-transfer zoo
import``), which records it in ``registry.json`` with its SHA-256; loading a registered model checks
that digest. Models the user trains are registered the same way.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text, file_lock
from .errors import RobustTransferError
from .models.checkpoint import (
    RESERVED_KEYS,
    check_given_stats,
    load_saved,
    save_model,
    sha256_file,
    weights_path,
)
from .models.normalization import NormalizedModel
from .models.spec import Stats

ENV_VAR = "ROBUST_TRANSFER_MODELS"
DEFAULT_DIR = Path("~/.cache/robust-transfer/models")
REGISTRY_NAME = "registry.json"
REGISTRY_FORMAT = "robust-transfer-zoo/1"
PAPER = (
    "Salman et al. 2020, Do Adversarially Robust ImageNet Models Transfer Better? (microsoft/robust-models-transfer)"
)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}$")
_FILE_SUFFIXES = (".json", ".safetensors", ".pt", ".pth", ".ckpt", ".bin", ".tmp")


@dataclass(frozen=True)
class ZooEntry:
    """One released model: ``eps`` is in [0, 1] pixel units (Linf 4/255 = 0.0157), ``eps_label`` as the paper writes it.

    ``filename`` is the name the file was released under; ``clean_top1`` the reported clean
    ImageNet validation top-1 in percent (None where we do not have it).
    """

    name: str
    arch: str
    norm: str
    eps: float
    eps_label: str
    filename: str
    clean_top1: float | None = None

    @property
    def threat(self) -> str:
        return f"{self.norm} eps {self.eps_label}"

    def metadata(self) -> dict[str, Any]:
        """What we know about the model, in our metadata keys (threat, source data, input size, accuracies)."""
        document: dict[str, Any] = {
            "threat": {"norm": self.norm, "eps": self.eps},
            "source_data": "imagenet",
            "input_size": 224,
            "zoo": {"name": self.name, "released_file": self.filename, "paper": PAPER},
        }
        if self.clean_top1 is not None:
            document["accuracies"] = {"imagenet_val": {"clean_acc": self.clean_top1 / 100, "reported": PAPER}}
        return document


# File names use the robustness library's short names for the torchvision-wrapped architectures.
_RELEASED_ARCH = {
    "densenet161": "densenet",
    "mnasnet1_0": "mnasnet",
    "mobilenet_v2": "mobilenet",
    "shufflenet_v2_x1_0": "shufflenet",
}
_L2_ALL = ("0", "0.01", "0.03", "0.05", "0.1", "0.25", "0.5", "1", "3", "5")
_L2_RESNET50_TOP1 = (75.80, 75.68, 75.76, 75.59, 74.78, 74.14, 73.16, 70.43, 62.83, 56.13)
_LINF = ("0.5", "1", "2", "4", "8")


def _manifest() -> dict[str, ZooEntry]:
    entries: list[ZooEntry] = []
    for arch in ("resnet18", "resnet50", "wide_resnet50_2", "wide_resnet50_4"):
        for i, label in enumerate(_L2_ALL):
            top1 = _L2_RESNET50_TOP1[i] if arch == "resnet50" else None
            entries.append(ZooEntry(f"{arch}_l2_eps{label}", arch, "l2", float(label), label,
                                    f"{arch}_l2_eps{label}.ckpt", top1))
    for arch in ("densenet161", "mnasnet1_0", "mobilenet_v2", "resnext50_32x4d", "shufflenet_v2_x1_0", "vgg16_bn"):
        for label in ("0", "3"):
            released = _RELEASED_ARCH.get(arch, arch)
            entries.append(ZooEntry(f"{arch}_l2_eps{label}", arch, "l2", float(label), label,
                                    f"{released}_l2_eps{label}.ckpt"))
    for arch in ("resnet18", "resnet50", "wide_resnet50_2"):
        for label in _LINF:
            entries.append(ZooEntry(f"{arch}_linf_eps{label}", arch, "linf", float(label) / 255, f"{label}/255",
                                    f"{arch}_linf_eps{float(label):.1f}.ckpt"))
    return {entry.name: entry for entry in entries}


MANIFEST: dict[str, ZooEntry] = _manifest()
"""Every model the paper released, by zoo name (e.g. ``resnet50_l2_eps3``, ``resnet18_linf_eps4``)."""


def zoo_entry(name: str) -> ZooEntry | None:
    """The manifest entry for ``name`` (``resnet50_l2_eps0_01`` is accepted for ``resnet50_l2_eps0.01``)."""
    if name in MANIFEST:
        return MANIFEST[name]
    for entry in MANIFEST.values():
        if entry.name.replace(".", "_") == name:
            return entry
    return None


# --- the local model directory -----------------------------------------------------------------------


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


def _write_registry(directory: Path, models: dict[str, dict[str, Any]]) -> None:
    document = {"format": REGISTRY_FORMAT, "models": dict(sorted(models.items()))}
    atomic_write_text(directory / REGISTRY_NAME, json.dumps(document, indent=2) + "\n")


def _locked(directory: Path):
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


def _placement_error(entry: ZooEntry, directory: Path) -> RobustTransferError:
    return RobustTransferError(
        f"zoo model {entry.name} is not in the local model directory {directory}: place the released file "
        f"{entry.filename} ({PAPER}) at {directory / entry.filename}, or convert a copy with: robust-transfer zoo "
        f"import FILE --name {entry.name}"
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
        raise _placement_error(entry, directory)
    if arch is not None and arch != entry.arch:
        raise RobustTransferError(f"{entry.name} is a {entry.arch} model; leave arch out or pass {entry.arch!r}")
    from .models.legacy import load_foreign

    model = load_foreign(released, entry.arch, mean, std)
    model.metadata.update(entry.metadata())
    model.metadata["zoo_name"] = entry.name
    return model


def import_model(
    source: str | os.PathLike[str],
    name: str,
    model_dir: str | os.PathLike[str] | None = None,
    arch: str | None = None,
    mean: Stats | None = None,
    std: Stats | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Convert any supported model file into our format in the model directory and register it as ``name``.

    ``source`` is a file, or the zoo name of a released file placed in the model directory. For a
    name of the paper's manifest the architecture, threat model and reported accuracy are taken
    from the manifest. Returns the registry record (file, sha256, arch, source and its
    sha256, ...) plus ``path`` and ``arch_inferred``. An existing name is replaced only with ``force``.
    """
    from .models.checkpoint import load_model

    check_name(name)
    directory = model_directory(model_dir)
    entry = MANIFEST.get(name)
    if entry is not None and arch is not None and arch != entry.arch:
        raise RobustTransferError(f"{name} is the paper's {entry.arch} model; leave --arch out or pass {entry.arch}")
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
    model = load_model(source_path, entry.arch if entry is not None else arch, mean=mean, std=std)
    metadata = {k: v for k, v in model.metadata.items() if k not in RESERVED_KEYS and k != "zoo_name"}
    if entry is not None:
        metadata.update(entry.metadata())
    source_sha256 = sha256_file(source_path)
    metadata["zoo"] = {**metadata.get("zoo", {}), "name": name, "imported_from": str(source_path.resolve()),
                       "source_sha256": source_sha256}
    with _locked(directory):
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
        _write_registry(directory, registry)
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
                     "threat": entry.threat, "clean_top1": entry.clean_top1, "paper_model": True,
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
        info.update({k: v for k, v in asdict(entry).items() if k != "name"})
        info["threat"] = entry.threat
        info["released_path"] = str(directory / entry.filename)
        info["paper"] = PAPER
    info["status"] = status(info["name"], directory, registry)
    if key is not None:
        record = registry[key]
        info["registered"] = {**record, "path": str(directory / str(record.get("file", "")))}
        meta = weights_path(directory / str(record.get("file", ""))).with_suffix(".json")
        with contextlib.suppress(OSError, json.JSONDecodeError, UnicodeDecodeError):
            document = json.loads(meta.read_text(encoding="utf-8"))
            info["metadata"] = {k: v for k, v in document.items() if k not in ("format", "sha256")}
    elif entry is not None and info["status"] == "absent":
        info["todo"] = str(_placement_error(entry, directory))
    return info
