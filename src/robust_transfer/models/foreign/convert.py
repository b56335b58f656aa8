"""From another tool's file to a `NormalizedModel`: name the architecture, lay the weights out as ours, take
the normalisation the file carries (or the user's, or the architecture's default), and load."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...errors import RobustTransferError
from ..model_file import EXPORT_FORMAT, FORMAT, assign_state
from ..normalization import NormalizedModel
from ..registry import ARCHITECTURES, build_classifier, check_arch, rebuild, resolve_normalization
from ..spec import ModelSpec, Stats, check_options
from ..state import check_state_dict_fits
from ..timm_arch import convert_checkpoint, is_timm
from .architectures import classes_and_channels, fill_batch_counts, has_names_of, infer_architectures, probe
from .layouts import parse_layout
from .reading import pick_state_dict, read_checkpoint, safetensors_header
from .timm_names import from_timm_names

log = logging.getLogger(__name__)


@dataclass
class Converted:
    """A foreign state dict ready to load: the spec to build, the full `NormalizedModel` state and notes."""

    spec: ModelSpec
    state: dict[str, torch.Tensor]
    layout: str
    arch_inferred: bool
    normalization: str
    notes: list[str]


def _name_architecture(weights: dict[str, torch.Tensor], arch: str | None, source: str
                       ) -> tuple[dict[str, torch.Tensor], str, bool, bool]:
    """(weights in the architecture's names, arch, whether inferred, whether the names were timm's)."""
    candidates = [arch] if arch is not None else list(ARCHITECTURES)
    if arch is None or arch in ARCHITECTURES:
        if not any(has_names_of(weights, a) for a in candidates):
            mapped = from_timm_names(weights, arch)
            if mapped is not None:
                return mapped[0], mapped[1], False, True
    if arch is not None:
        return weights, arch, False, False
    matches = infer_architectures(weights)
    if len(matches) != 1:
        why = (
            f"its weights fit several ({', '.join(matches)})" if matches
            else "its weights match none of the registered ones by name and shape"
        )
        raise RobustTransferError(
            f"{source} does not name its architecture and {why}; pass it with arch=... (--arch), one of: "
            f"{', '.join(ARCHITECTURES)}, or timm:NAME, or package.module:function"
        )
    return weights, matches[0], True, False


def convert_state_dict(
    state: Mapping[str, torch.Tensor],
    source: str = "the state dict",
    arch: str | None = None,
    mean: Stats | None = None,
    std: Stats | None = None,
    carried: tuple[Sequence[float], Sequence[float]] | None = None,
    layout: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Converted:
    """Name the architecture of a foreign state dict and lay it out as a `NormalizedModel`'s.

    ``arch`` may be any architecture `create_model` takes (registered, ``timm:NAME`` with ``options``,
    a builder); without it, a registered architecture is inferred from the key names and shapes. No
    weights are copied (meta tensors work). ``carried`` is normalisation recorded beside the file (an
    export's JSON, a zoo entry's preprocessing); ``layout`` overrides the detected layout's name.
    """
    parsed = parse_layout(state, source)
    if carried is not None and parsed.mean is None:
        parsed.mean, parsed.std = tuple(carried[0]), tuple(carried[1])
    if arch is not None:
        check_arch(arch)
    options = check_options(options)
    weights, arch, inferred, timm_names = _name_architecture(parsed.weights, arch, source)
    if timm_names:
        parsed.layout = "timm"
    if is_timm(arch) and not has_names_of(weights, arch, options):
        with torch.device("meta"):
            converted = convert_checkpoint(build_classifier(arch, 1000, 3, options), weights)
        if converted is not None and has_names_of(converted, arch, options):
            weights = converted
            parsed.notes.append("converted from an older layout by timm's checkpoint_filter_fn")
    found = probe(arch, options)
    weights = fill_batch_counts(weights, found.keys)
    num_classes, in_channels = classes_and_channels(weights, found)
    carried_stats = (parsed.mean, parsed.std) if parsed.mean is not None and parsed.std is not None else None
    model_mean, model_std, origin = resolve_normalization(carried_stats, mean, std, arch, in_channels, source)
    spec = ModelSpec(arch, num_classes, in_channels, model_mean, model_std, options=options)
    full = {
        "normalize.mean": torch.tensor(model_mean, dtype=torch.float32).reshape(1, -1, 1, 1),
        "normalize.std": torch.tensor(model_std, dtype=torch.float32).reshape(1, -1, 1, 1),
        **{f"model.{k}": v for k, v in weights.items()},
    }
    with torch.device("meta"):
        reference = rebuild(spec)
    try:
        check_state_dict_fits(reference, full, source, arch)
    except RobustTransferError as error:
        fits = [a for a in infer_architectures(weights) if a != arch]
        hint = f"; its weights fit {', '.join(repr(a) for a in fits)}" if fits else ""
        raise RobustTransferError(f"{error}{hint}") from None
    return Converted(spec, full, layout or parsed.layout, inferred, origin, parsed.notes)


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta:
        return value.item()
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "size", 0) == 1:
        return value.item()
    if isinstance(value, (int, float, str, bool)):
        return value
    return None


def export_info(path: Path) -> dict[str, Any] | None:
    """The JSON an export wrote beside ``path`` (format `EXPORT_FORMAT`), or None."""
    meta = path.with_suffix(".json")
    if not meta.is_file():
        return None
    try:
        document = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(document, dict) and document.get("format") == EXPORT_FORMAT:
        return document
    return None


def _source_format(kind: str, layout: str, info: dict[str, Any] | None) -> str:
    if info is not None:
        return f"{info.get('layout')} export"
    if kind == "safetensors" and layout == "plain":
        return "safetensors"
    return "torchvision" if layout == "plain" else layout


def load_foreign(
    path: str | Path,
    arch: str | None = None,
    mean: Stats | None = None,
    std: Stats | None = None,
    options: Mapping[str, Any] | None = None,
    carried: tuple[Sequence[float], Sequence[float]] | None = None,
) -> NormalizedModel:
    """Load any supported non-native file as a `NormalizedModel` (CPU, eval mode).

    ``arch`` (with ``options`` for timm architectures and builders) is needed when the file does not
    name its architecture and its weights do not identify exactly one registered architecture.
    ``mean``/``std`` are the normalisation a plain state dict expects (default: the architecture's);
    files that carry their own normalisation (robustness library, RobustBench, our exports) use theirs,
    and so does ``carried`` (what a zoo entry knows of the file's preprocessing). The model's
    ``.metadata`` says what was read: source, layout, whether the architecture was inferred, where the
    normalisation came from, and the checkpoint's epoch and accuracies if present.
    """
    path = Path(path)
    obj, kind = read_checkpoint(path)
    source = str(path)
    state, extras, container = pick_state_dict(obj, source)
    info = export_info(path)
    if info is not None:
        arch = arch or info.get("arch")
        if info.get("mean") is not None and info.get("std") is not None:
            carried = (info["mean"], info["std"])
    elif kind == "safetensors":
        header = (safetensors_header(path) or {}).get("__metadata__") or {}
        if header.get("format") == EXPORT_FORMAT:
            arch = arch or header.get("arch")
            try:
                carried = (json.loads(header["mean"]), json.loads(header["std"]))
            except (KeyError, TypeError, json.JSONDecodeError):
                carried = None
    converted = convert_state_dict(state, source, arch, mean, std, carried, options=options)
    del obj, state
    spec = converted.spec
    with torch.device("meta"):
        model = rebuild(spec)
    assign_state(model, converted.state, source, spec.arch)
    if converted.arch_inferred:
        log.info("%s: architecture %s inferred from the weights' names and shapes", path.name, spec.arch)
    if converted.normalization == "default":
        log.info("%s: no normalisation in the file; using %s's default mean %s, std %s", path.name, spec.arch,
                 list(spec.mean), list(spec.std))
    metadata: dict[str, Any] = {
        "format": FORMAT,
        "spec": spec.to_dict(),
        "source": source,
        "source_format": _source_format(kind, converted.layout, info),
        "arch_inferred": converted.arch_inferred,
        "normalization": converted.normalization,
    }
    if container is not None:
        metadata["container_key"] = container
    for key in ("epoch", "nat_prec1", "adv_prec1"):
        value = _scalar(extras.get(key))
        if value is not None:
            metadata[key] = value
    if info is not None:
        for key in ("threat", "source_data", "input_size", "accuracies", "zoo"):
            if key in info:
                metadata[key] = info[key]
    model.metadata = metadata
    return model.eval()
