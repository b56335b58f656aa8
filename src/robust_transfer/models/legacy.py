"""Reading other tools' checkpoints: the paper's released files (robustness library), plain torchvision
and timm state dicts, RobustBench-style state dicts and plain safetensors files.

Nothing here unpickles code: torch files go through ``torch.load(..., weights_only=True)`` (tensors
and plain containers only), safetensors files through safetensors, and a file that asks for any
other pickled object is refused before anything in it runs, with the command that converts it in
a trusted environment.

The flow is: read the file (`read_checkpoint`) -> pick the state dict out of its container ->
turn its key layout into the bare classifier's torchvision names plus the normalisation the file
carries (`parse_layout`) -> name the architecture (given, recorded beside the file, or inferred
from key names and shapes with `infer_architectures`) -> build the `NormalizedModel`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import pickle
import pickletools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RobustTransferError
from .checkpoint import FORMAT, assign_state, check_state_dict_fits
from .normalization import NormalizedModel
from .registry import ARCHITECTURES, create_model, default_stats, get_architecture
from .spec import ModelSpec, Stats, resolve_stats
from .surgery import classifier_head, first_conv

log = logging.getLogger(__name__)

EXPORT_FORMAT = "robust-transfer-export/1"
"""``format`` of the small JSON written beside an exported file (see `robust_transfer.models.export`)."""

CONTAINER_KEYS = ("model", "state_dict", "model_state_dict")
"""Entries of a checkpoint dict that may hold the state dict, in the order they are tried."""

TIMM_NAMES = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "wide_resnet50_2": "wide_resnet50_2",
    "resnext50_32x4d": "resnext50_32x4d",
    "densenet161": "densenet161",
    "mobilenet_v2": "mobilenetv2_100",
    "mnasnet1_0": "mnasnet_100",
    "vgg16_bn": "vgg16_bn",
}
"""Registry architectures that timm also defines, with timm's name (same layers, same numbers)."""

TIMM_SAME_KEYS = frozenset({"resnet18", "resnet50", "wide_resnet50_2", "resnext50_32x4d", "densenet161"})
"""Architectures whose timm state-dict names are torchvision's; the others are mapped in order."""

_TIMM_MARKERS = ("conv_stem.weight", "pre_logits.fc1.weight", "head.fc.weight")

_ZIP_MAGIC = b"PK\x03\x04"
# torch.save's pre-1.6 format opens with a protocol-2 pickle of this magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"

CONVERT_COMMAND = (
    "python -c \"import sys,torch; c=torch.load(sys.argv[1],map_location='cpu',weights_only=False); "
    "s=c.get('model',c.get('state_dict',c)) if isinstance(c,dict) else c.state_dict(); "
    "torch.save({k:v for k,v in s.items() if torch.is_tensor(v)},sys.argv[2])\" IN OUT"
)
"""Run only in a trusted environment (it unpickles the file): keeps the tensors, drops everything else."""

_ROBUSTNESS_NORMALIZERS = {
    "normalizer.new_mean": "mean",
    "normalizer.new_std": "std",
    "attacker.normalize.new_mean": "mean",
    "attacker.normalize.new_std": "std",
}


# --- reading files --------------------------------------------------------------------------------


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
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return []
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
        from safetensors.torch import load_file

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


# --- key layouts ------------------------------------------------------------------------------------


@dataclass
class ParsedState:
    """A state dict in the bare classifier's names, the normalisation the file carries and where it came from."""

    weights: dict[str, torch.Tensor]
    layout: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    notes: list[str] = field(default_factory=list)


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _strip_all(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` while every key carries it (``module.`` from DataParallel, a wrapper's ``model.``)."""
    while state and all(k.startswith(prefix) for k in state):
        state = _strip(state, prefix)
    return state


def _stats(tensor: torch.Tensor, key: str, source: str) -> tuple[float, ...]:
    if tensor.is_meta:
        return (0.0,) * tensor.numel()
    values = tuple(float(v) for v in tensor.detach().float().flatten().tolist())
    if not values or not all(math.isfinite(v) for v in values):
        raise RobustTransferError(f"{source}: normalisation buffer {key} holds {values}; the file is corrupt")
    return values


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_meta or b.is_meta:
        return True
    if a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    return torch.equal(a, b)


def _rename_old_densenet(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # torchvision < 0.3 wrote DenseNet layers as "norm.1", "conv.2"; today's names are "norm1", "conv2".
    pattern = re.compile(
        r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
    )
    if not any(pattern.match(k) for k in weights):
        return weights
    return {(m.group(1) + m.group(2) if (m := pattern.match(k)) else k): v for k, v in weights.items()}


def parse_layout(state: Mapping[str, torch.Tensor], source: str = "the state dict") -> ParsedState:
    """Turn a foreign state dict into the bare classifier's torchvision names plus its normalisation.

    Recognised layouts (after any ``module.`` prefixes are removed):

    - robustness library: ``model.<names>`` or ``model.model.<names>``, an optional identical copy
      under ``attacker.model.``, and the buffers ``normalizer.new_mean/new_std`` and
      ``attacker.normalize.new_mean/new_std`` ([3,1,1]); the copies must agree.
    - RobustBench / a `NormalizedModel`'s state dict: ``normalize.mean``, ``normalize.std`` and ``model.<names>``.
    - plain torchvision (or timm, mapped later): the names as they are (a ``model.`` wrapper is removed).

    Works on meta tensors too (then only names and shapes are compared).
    """
    keys = _strip_all(dict(state), "module.")
    if any(k.startswith(("attacker.", "normalizer.")) for k in keys):
        return _parse_robustness(keys, source)
    if "normalize.mean" in keys and "normalize.std" in keys:
        mean = _stats(keys.pop("normalize.mean"), "normalize.mean", source)
        std = _stats(keys.pop("normalize.std"), "normalize.std", source)
        outside = [k for k in keys if not k.startswith("model.")]
        if outside:
            raise RobustTransferError(
                f"{source} has normalize.mean/std (RobustBench layout) but also keys outside model.: "
                f"{', '.join(outside[:4])}; it is not a classifier state dict we can read"
            )
        weights = _rename_old_densenet(_strip_all(_strip(keys, "model."), "model."))
        return ParsedState(weights, "robustbench", mean, std)
    return ParsedState(_rename_old_densenet(_strip_all(keys, "model.")), "plain")


def _parse_robustness(keys: dict[str, torch.Tensor], source: str) -> ParsedState:
    main = _strip_all(_strip(keys, "model."), "model.")
    attacker = _strip_all(_strip(keys, "attacker.model."), "model.")
    buffers = {k: v for k, v in keys.items() if k in _ROBUSTNESS_NORMALIZERS}
    other = [
        k for k in keys
        if not k.startswith(("model.", "attacker.model.")) and k not in _ROBUSTNESS_NORMALIZERS
    ]
    if other:
        raise RobustTransferError(
            f"{source} looks like a robustness-library checkpoint but has keys that layout does not have: "
            f"{', '.join(other[:4])}; it cannot be read as one"
        )
    if not main:
        raise RobustTransferError(
            f"{source} looks like a robustness-library checkpoint but holds no module.model.* weights"
        )
    notes = []
    if attacker:
        if set(attacker) != set(main):
            extra = sorted(set(attacker) ^ set(main))
            raise RobustTransferError(
                f"the two copies of the weights in {source} (module.model.* and module.attacker.model.*) have "
                f"different keys ({', '.join(extra[:4])}): the file is corrupt or was edited; use it as released"
            )
        differ = [k for k in main if not _same(main[k], attacker[k])]
        if differ:
            raise RobustTransferError(
                f"the two copies of the weights in {source} disagree at {', '.join(differ[:4])}"
                f"{f' ({len(differ)} tensors)' if len(differ) > 4 else ''}: module.model.* and "
                "module.attacker.model.* must be identical; the file is corrupt or was edited, use it as released"
            )
        notes.append("attacker copy checked: identical")
    mean = std = None
    for which in ("mean", "std"):
        found = {k: _stats(v, k, source) for k, v in buffers.items() if _ROBUSTNESS_NORMALIZERS[k] == which}
        distinct = set(found.values())
        if len(distinct) > 1:
            raise RobustTransferError(
                f"{source}: the normaliser buffers disagree ({'; '.join(f'{k}={v}' for k, v in found.items())}); "
                "the file is corrupt or was edited"
            )
        if distinct:
            if which == "mean":
                mean = distinct.pop()
            else:
                std = distinct.pop()
    if (mean is None) != (std is None):
        raise RobustTransferError(f"{source} has a normaliser mean without a std (or the reverse); it is corrupt")
    return ParsedState(_rename_old_densenet(main), "robustness", mean, std, notes)


# --- architectures ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Probe:
    keys: frozenset[str]
    head: str | None
    stem: str | None


@functools.cache
def _probe(arch: str) -> _Probe:
    """State-dict names, classifier-head and stem layer names of ``arch`` (built weightless, on meta)."""
    entry = get_architecture(arch)
    with torch.device("meta"):
        model = entry.build(1000, 3)
    return _probe_module(model)


def _probe_module(model: nn.Module) -> _Probe:
    try:
        head: str | None = classifier_head(model)[0]
    except RobustTransferError:
        head = None
    try:
        stem: str | None = first_conv(model)[0]
    except RobustTransferError:
        stem = None
    return _Probe(frozenset(model.state_dict()), head, stem)


def _signature(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _classes_and_channels(weights: Mapping[str, torch.Tensor], probe: _Probe) -> tuple[int, int]:
    head = weights.get(f"{probe.head}.weight") if probe.head else None
    stem = weights.get(f"{probe.stem}.weight") if probe.stem else None
    num_classes = int(head.shape[0]) if head is not None and head.dim() >= 1 and head.shape[0] > 0 else 1000
    in_channels = int(stem.shape[1]) if stem is not None and stem.dim() == 4 and stem.shape[1] > 0 else 3
    return num_classes, in_channels


def _fill_batch_counts(weights: dict[str, torch.Tensor], keys: frozenset[str]) -> dict[str, torch.Tensor]:
    # Files from torch < 0.4.1 have no BatchNorm num_batches_tracked; eval never reads it.
    missing = [k for k in keys if k.endswith(".num_batches_tracked") and k not in weights]
    if not missing or set(weights) | set(missing) != keys:
        return weights
    return {**weights, **{k: torch.tensor(0, dtype=torch.long) for k in missing}}


def infer_architectures(weights: Mapping[str, torch.Tensor]) -> list[str]:
    """Registry architectures whose state dict has exactly these names and shapes (any class count)."""
    matches = []
    for arch, entry in ARCHITECTURES.items():
        probe = _probe(arch)
        candidate = _fill_batch_counts(dict(weights), probe.keys)
        if frozenset(candidate) != probe.keys:
            continue
        num_classes, in_channels = _classes_and_channels(candidate, probe)
        with torch.device("meta"):
            reference = entry.build(num_classes, in_channels)
        if _signature(reference.state_dict()) == _signature(candidate):
            matches.append(arch)
    return matches


def timm_module() -> Any:
    """The timm package, or None when it is not installed (it is optional)."""
    try:
        import timm
    except ImportError:
        return None
    return timm


def timm_reference(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """timm's model for ``arch``, built weightless on the meta device (pretrained=False: nothing is downloaded)."""
    timm = timm_module()
    if timm is None:
        raise RobustTransferError(
            f"converting between torchvision and timm names for {arch} needs timm: pip install timm"
        )
    with torch.device("meta"):
        return timm.create_model(TIMM_NAMES[arch], pretrained=False, num_classes=num_classes, in_chans=in_channels)


def timm_key_map(arch: str, num_classes: int = 1000, in_channels: int = 3) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(torchvision name, timm name, timm shape)`` for every tensor of ``arch``, in state-dict order.

    The two definitions register the same layers in the same order (checked: same count and the
    same number of elements per tensor); VGG's first two classifier layers are convolutions in
    timm, so their weights are reshaped.
    """
    if arch not in TIMM_NAMES:
        raise RobustTransferError(
            f"timm has no architecture matching {arch!r}; export it as torchvision or safetensors instead "
            f"(timm has: {', '.join(TIMM_NAMES)})"
        )
    entry = get_architecture(arch)
    with torch.device("meta"):
        ours = entry.build(num_classes, in_channels).state_dict()
    if arch in TIMM_SAME_KEYS:
        return [(k, k, tuple(v.shape)) for k, v in ours.items()]
    theirs = timm_reference(arch, num_classes, in_channels).state_dict()
    pairs = list(zip(ours.items(), theirs.items(), strict=False))
    if len(ours) != len(theirs) or any(a.numel() != b.numel() for (_, a), (_, b) in pairs):
        raise RobustTransferError(
            f"this timm version's {TIMM_NAMES[arch]} no longer matches torchvision's {arch} layer for layer; "
            "export it as torchvision or safetensors instead"
        )
    return [(ka, kb, tuple(b.shape)) for (ka, _), (kb, b) in pairs]


def _from_timm(weights: dict[str, torch.Tensor], arch: str | None, source: str) -> tuple[dict, str] | None:
    """Map a timm-named state dict (for an architecture whose timm names differ) to torchvision names."""
    if not any(marker in weights for marker in _TIMM_MARKERS):
        return None
    if arch is not None and arch not in TIMM_NAMES:
        return None
    candidates = [a for a in ([arch] if arch else TIMM_NAMES) if a not in TIMM_SAME_KEYS]
    if not candidates:
        return None
    if timm_module() is None:
        raise RobustTransferError(
            f"{source} has timm's layer names (e.g. {next(m for m in _TIMM_MARKERS if m in weights)}); "
            "converting them needs timm: pip install timm"
        )
    for candidate in candidates:
        reference = timm_reference(candidate, 1000, 3)
        probe = _probe_module(reference)
        if frozenset(weights) != probe.keys:
            continue
        num_classes, in_channels = _classes_and_channels(weights, probe)
        mapping = timm_key_map(candidate, num_classes, in_channels)
        with torch.device("meta"):
            ours = get_architecture(candidate).build(num_classes, in_channels).state_dict()
        converted = {}
        for tv_key, timm_key, _ in mapping:
            tensor = weights[timm_key]
            if tensor.numel() != ours[tv_key].numel():
                break
            converted[tv_key] = tensor.reshape(ours[tv_key].shape)
        else:
            return converted, candidate
    return None


# --- building the model -----------------------------------------------------------------------------


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-6 * max(1.0, abs(y)) for x, y in zip(a, b, strict=True))


def resolve_normalization(
    carried: tuple[tuple[float, ...], tuple[float, ...]] | None,
    mean: Stats | None,
    std: Stats | None,
    arch: str,
    in_channels: int,
    source: str,
) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, where from): the file's own statistics, else the user's, else the architecture's default.

    Statistics given by the user must agree with those the file carries: a mismatch is an error,
    since it means one of them would normalise the images a second time or not at all.
    """
    if carried is not None:
        file_mean, file_std = carried
        for given, found, what in ((mean, file_mean, "mean"), (std, file_std, "std")):
            if given is not None and not _close(resolve_stats(given, in_channels, 0.5, what), found):
                raise RobustTransferError(
                    f"{source} carries its own normalisation ({what} {list(found)}), which differs from the "
                    f"{what} you gave ({given}); leave mean/std out to use the file's"
                )
        return (
            resolve_stats(file_mean, in_channels, 0.5, "mean"),
            resolve_stats(file_std, in_channels, 0.5, "std"),
            "file",
        )
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise RobustTransferError("give both mean and std (one value per channel), or neither")
        return resolve_stats(mean, in_channels, 0.5, "mean"), resolve_stats(std, in_channels, 0.5, "std"), "given"
    default_mean, default_std = default_stats(arch, in_channels)
    return default_mean, default_std, "default"


@dataclass
class Converted:
    """A foreign state dict ready to load: the spec to build, the full `NormalizedModel` state and notes."""

    spec: ModelSpec
    state: dict[str, torch.Tensor]
    layout: str
    arch_inferred: bool
    normalization: str
    notes: list[str]


def convert_state_dict(
    state: Mapping[str, torch.Tensor],
    source: str = "the state dict",
    arch: str | None = None,
    mean: Stats | None = None,
    std: Stats | None = None,
    carried: tuple[Sequence[float], Sequence[float]] | None = None,
    layout: str | None = None,
) -> Converted:
    """Name the architecture of a foreign state dict and lay it out as a `NormalizedModel`'s.

    No weights are copied (meta tensors work). ``carried`` is normalisation recorded beside the
    file (an export's JSON); ``layout`` overrides the detected layout's name.
    """
    parsed = parse_layout(state, source)
    if carried is not None and parsed.mean is None:
        parsed.mean, parsed.std = tuple(carried[0]), tuple(carried[1])
    if arch is not None:
        get_architecture(arch)
    weights = parsed.weights
    candidates = [arch] if arch is not None else list(ARCHITECTURES)
    torchvision_names = any(frozenset(_fill_batch_counts(dict(weights), _probe(a).keys)) == _probe(a).keys
                            for a in candidates)
    timm_layout = None if torchvision_names else _from_timm(weights, arch, source)
    if timm_layout is not None:
        weights, arch = timm_layout
        parsed.layout = "timm"
    inferred = False
    if arch is None:
        matches = infer_architectures(weights)
        if len(matches) != 1:
            why = (
                f"its weights fit several ({', '.join(matches)})" if matches
                else "its weights match none of the registered ones by name and shape"
            )
            raise RobustTransferError(
                f"{source} does not name its architecture and {why}; pass it with arch=... (--arch), one of: "
                f"{', '.join(ARCHITECTURES)}"
            )
        arch, inferred = matches[0], True
    probe = _probe(arch)
    weights = _fill_batch_counts(weights, probe.keys)
    num_classes, in_channels = _classes_and_channels(weights, probe)
    carried_stats = (parsed.mean, parsed.std) if parsed.mean is not None and parsed.std is not None else None
    model_mean, model_std, origin = resolve_normalization(carried_stats, mean, std, arch, in_channels, source)
    spec = ModelSpec(arch, num_classes, in_channels, model_mean, model_std)
    full = {
        "normalize.mean": torch.tensor(model_mean, dtype=torch.float32).reshape(1, -1, 1, 1),
        "normalize.std": torch.tensor(model_std, dtype=torch.float32).reshape(1, -1, 1, 1),
        **{f"model.{k}": v for k, v in weights.items()},
    }
    with torch.device("meta"):
        reference = create_model(arch, num_classes, in_channels, model_mean, model_std)
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
) -> NormalizedModel:
    """Load any supported non-native file as a `NormalizedModel` (CPU, eval mode).

    ``arch`` is needed when the file does not name its architecture and its weights do not
    identify exactly one registered architecture. ``mean``/``std`` are the normalisation a
    plain state dict expects (default: the architecture's); files that carry their own
    normalisation (robustness library, RobustBench, our exports) use theirs. The model's
    ``.metadata`` says what was read: source, layout, whether the architecture was inferred,
    where the normalisation came from, and the checkpoint's epoch and accuracies if present.
    """
    path = Path(path)
    obj, kind = read_checkpoint(path)
    source = str(path)
    state, extras, container = pick_state_dict(obj, source)
    info = export_info(path)
    carried = None
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
    converted = convert_state_dict(state, source, arch, mean, std, carried)
    del obj, state
    spec = converted.spec
    with torch.device("meta"):
        model = create_model(spec.arch, spec.num_classes or 1, spec.in_channels, spec.mean, spec.std)
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
