"""Key layouts of other tools' state dicts, turned into the bare classifier's names plus the normalisation
the file carries: the robustness library's (the paper's released files), RobustBench's and plain ones.

Works on meta tensors too (then only names and shapes are compared).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ...errors import RobustTransferError

_ROBUSTNESS_NORMALIZERS = {
    "normalizer.new_mean": "mean",
    "normalizer.new_std": "std",
    "attacker.normalize.new_mean": "mean",
    "attacker.normalize.new_std": "std",
}


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
    - plain torchvision or timm (ARES's files): the names as they are (a ``model.`` wrapper is removed);
    - Singh et al.'s training checkpoints: ``module.base_model.<timm names>`` (the prefix is removed).

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
    return ParsedState(_rename_old_densenet(_strip_all(_strip_all(keys, "base_model."), "model.")), "plain")


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

