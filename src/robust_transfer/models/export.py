"""Exporting a model for other tools: a torchvision state dict, safetensors, or a timm state dict.

Other tools' models take normalised images, so the normalisation layer is left out of the
exported weights and its mean/std go into a small JSON beside the file (``OUT.json``, format
``robust-transfer-export/1``, with the architecture, class count, the file's SHA-256 and how to
load it). `load_model` reads every export back, picking up that JSON.
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
from safetensors.torch import save
from torch import nn

from ..atomic import atomic_open, atomic_write_text
from ..errors import RobustTransferError
from .foreign.timm_names import TIMM_NAMES, timm_key_map, timm_reference
from .model_file import EXPORT_FORMAT, FORMAT, sha256_file, unwrap
from .normalization import NormalizedModel
from .registry import CUSTOM
from .timm_arch import PREFIX, is_timm

EXPORT_FORMATS = ("torchvision", "safetensors", "timm")
_CARRIED = ("threat", "source_data", "input_size", "accuracies", "zoo")


def _plain_state(model: NormalizedModel) -> OrderedDict[str, torch.Tensor]:
    """The bare classifier's state dict (torchvision names), detached CPU copies, with module versions kept."""
    state = model.model.state_dict()
    out: OrderedDict[str, torch.Tensor] = OrderedDict(
        (k, v.detach().to("cpu", copy=True).contiguous()) for k, v in state.items()
    )
    out._metadata = getattr(state, "_metadata", None)  # type: ignore[attr-defined]  # MNASNet needs its version
    return out


def to_timm_state(model: NormalizedModel) -> tuple[str, dict[str, torch.Tensor], bool]:
    """``(timm model name, state dict in timm's names, verified)``; verified says timm itself accepted it.

    Verification builds ``timm.create_model(name, pretrained=False, num_classes=..., in_chans=...)``
    on the meta device (no weights, nothing downloaded) and loads the state dict strictly.
    """
    spec = model.spec
    if is_timm(spec.arch):  # already timm's own layers and names
        return spec.arch[len(PREFIX):], dict(_plain_state(model)), True
    if spec.arch not in TIMM_NAMES:
        raise RobustTransferError(
            f"timm has no architecture matching {spec.arch!r}; export with --format torchvision or safetensors "
            f"(timm-loadable: {', '.join(TIMM_NAMES)})"
        )
    num_classes = spec.num_classes or 1000
    state = _plain_state(model)
    mapping = timm_key_map(spec.arch, num_classes, spec.in_channels)
    converted = {timm_key: state[tv_key].reshape(shape).contiguous() for tv_key, timm_key, shape in mapping}
    reference = timm_reference(spec.arch, num_classes, spec.in_channels)
    try:
        reference.load_state_dict(converted, strict=True, assign=True)
    except RuntimeError as exc:
        raise RobustTransferError(
            f"timm's {TIMM_NAMES[spec.arch]} does not accept the converted weights ({str(exc).splitlines()[0]}); "
            "export with --format torchvision instead"
        ) from None
    return TIMM_NAMES[spec.arch], converted, True


def _check_target(out: Path) -> Path:
    if out.suffix == ".json":
        raise RobustTransferError(f"{out}: the export's metadata goes to OUT.json; choose a weights file name "
                                  "such as model.pth or model.safetensors")
    meta = out.with_suffix(".json")
    if meta.is_file():
        try:
            found = json.loads(meta.read_text(encoding="utf-8")).get("format")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            found = None
        if found == FORMAT:
            raise RobustTransferError(
                f"{meta} belongs to a robust-transfer model; exporting to {out} would overwrite it, choose another name"
            )
    return meta


def export_model(
    model: nn.Module,
    out: str | os.PathLike[str],
    format: str = "torchvision",
    metadata: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``model``'s classifier weights (no normalisation layer) for another tool; returns (weights, JSON).

    - ``torchvision``: ``torch.save`` of the state dict (tensors only, weights-only loadable):
      ``torchvision.models.<arch>(num_classes=...).load_state_dict(torch.load(OUT, weights_only=True))``.
    - ``safetensors``: the same tensors in a safetensors file (arch, mean and std in its header).
    - ``timm``: the state dict in timm's names for ``timm.create_model(name, num_classes=...)``,
      checked by loading it into that timm model when timm is installed; a ``.safetensors`` name
      gives a safetensors file, any other a ``torch.save`` file.

    The JSON beside the file (``OUT.json``) records the format, architecture (and timm name),
    class count, input channels, the mean/std the images must be normalised with, the file's
    SHA-256 and the model's threat model and accuracies when known.
    """
    model = unwrap(model)
    if not isinstance(model, NormalizedModel):
        raise RobustTransferError(
            f"export needs a model with its normalisation in front (load_model or create_model), got "
            f"{type(model).__name__}"
        )
    if format not in EXPORT_FORMATS:
        raise RobustTransferError(f"unknown export format {format!r}; choose one of: {', '.join(EXPORT_FORMATS)}")
    out = Path(out)
    meta = _check_target(out)
    spec = model.spec
    info: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "layout": format,
        "arch": spec.arch if spec.arch != CUSTOM else None,
        "num_classes": spec.num_classes,
        "in_channels": spec.in_channels,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "file": out.name,
        "sha256": "",
    }
    source = {**getattr(model, "metadata", {}), **dict(metadata or {})}
    info.update({k: source[k] for k in _CARRIED if k in source})

    if format == "timm":
        timm_name, tensors, verified = to_timm_state(model)
        info["timm_name"] = timm_name
        info["verified_with_timm"] = verified
        info["load"] = (
            f"timm.create_model({timm_name!r}, pretrained=False, num_classes={spec.num_classes}, "
            f"in_chans={spec.in_channels}).load_state_dict(...); normalise inputs with mean/std"
        )
        container = "safetensors" if out.name.endswith(".safetensors") else "torch"
    else:
        tensors = _plain_state(model)
        container = "safetensors" if format == "safetensors" else "torch"
        builder = f"torchvision.models.{spec.arch}" if spec.arch != CUSTOM else "your model class"
        info["load"] = f"{builder}(num_classes={spec.num_classes}).load_state_dict(...); normalise inputs with mean/std"

    out.parent.mkdir(parents=True, exist_ok=True)
    if container == "safetensors":
        header = {"format": EXPORT_FORMAT, "layout": format, "arch": str(info["arch"]),
                  "mean": json.dumps(info["mean"]), "std": json.dumps(info["std"])}
        payload = save(dict(tensors), metadata=header)
        info["sha256"] = hashlib.sha256(payload).hexdigest()
        with atomic_open(out, "wb") as handle:
            handle.write(payload)
        del payload
    else:
        with atomic_open(out, "wb") as handle:
            torch.save(tensors, handle)
        info["sha256"] = sha256_file(out)
    atomic_write_text(meta, json.dumps(info, indent=2) + "\n")
    return out, meta
