"""BatchNorm folded into the convolution before it, for the passes an attack makes in eval mode.

In eval mode a BatchNorm is a fixed per-channel affine map, so ``bn(conv(x))`` equals one convolution with
scaled weights and a bias. An attack runs the model in eval mode with its parameters frozen, many passes
at a time (PGD-7 training: seven of a step's eight forward passes), so folding once per attack removes a
memory-bound BatchNorm pass from every forward and backward of the attack.

Only pairs whose data flow is known are folded: the conv must feed that BatchNorm and nothing else. The
flow is declared by the class that writes the ``forward`` (as stages and heads are declared, not probed):
consecutive ``Conv2d``, ``BatchNorm2d`` children of an ``nn.Sequential`` (torchvision's
``Conv2dNormActivation``, ResNet downsample branches, VGG-BN features), torchvision's ResNet stem and
blocks and timm's (`FOLDED_BY_CLASS`), and any class of ours or a user's that sets ``batchnorm_after = {"conv":
"bn"}`` beside its ``forward``. A subclass that rewrites ``forward`` drops its parent's declaration.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from timm.models import resnet as timm_resnet
from torch import nn
from torchvision.models import resnet as torchvision_resnet

FOLDED_BY_CLASS: dict[type, dict[str, str]] = {
    torchvision_resnet.ResNet: {"conv1": "bn1"},
    torchvision_resnet.BasicBlock: {"conv1": "bn1", "conv2": "bn2"},
    torchvision_resnet.Bottleneck: {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3"},
    timm_resnet.ResNet: {"conv1": "bn1"},  # a deep stem makes conv1 a Sequential: that pair then does not fold
    timm_resnet.BasicBlock: {"conv1": "bn1", "conv2": "bn2"},
    timm_resnet.Bottleneck: {"conv1": "bn1", "conv2": "bn2", "conv3": "bn3"},
}
"""conv -> BatchNorm pairs that torchvision's and timm's ResNet classes apply back to back in their ``forward``."""

# torchvision's ResNet.forward calls _forward_impl, timm's calls forward_features: a subclass rewriting either
# is not the declaring class any more.
_FORWARD_METHODS = ("forward", "_forward_impl", "forward_features")


def _declaring_class(module: nn.Module) -> type | None:
    """The one class whose ``forward`` (and ``_forward_impl`` / ``forward_features``, where it has them) the module
    runs; None when a subclass rewrote some of them."""
    owners = {next(c for c in type(module).__mro__ if name in vars(c))
              for name in _FORWARD_METHODS if hasattr(type(module), name)}
    return owners.pop() if len(owners) == 1 else None


def _declared_pairs(module: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    owner = _declaring_class(module)
    if owner is nn.Sequential:
        children = list(module.children())
        return list(zip(children, children[1:], strict=False))
    if owner is None:
        return []
    names = FOLDED_BY_CLASS.get(owner) or vars(owner).get("batchnorm_after", {})
    return [(getattr(module, conv, None), getattr(module, bn, None)) for conv, bn in names.items()]


def _is_batchnorm(module: nn.Module) -> bool:
    """BatchNorm2d, SyncBatchNorm, or a subclass declaring ``folds_in_eval_mode`` (eval mode runs BatchNorm2d's)."""
    return type(module) in (nn.BatchNorm2d, nn.SyncBatchNorm) or (
        isinstance(module, nn.BatchNorm2d) and vars(type(module)).get("folds_in_eval_mode", False))


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """A plain zero-padded Conv2d into an eval-mode BatchNorm with running statistics, neither hooked."""
    return (type(conv) is nn.Conv2d and _is_batchnorm(bn) and conv.padding_mode == "zeros"
            and not bn.training and bn.running_mean is not None and bn.num_features == conv.out_channels
            and not any(m._forward_hooks or m._forward_pre_hooks for m in (conv, bn)))


def foldable_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """The (conv, BatchNorm) pairs of ``model`` that `folded_batchnorm` folds in its current mode."""
    # A module placed twice in the tree runs twice; folding it for one place would be wrong at the other.
    placed = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    return [(conv, bn) for module in model.modules() for conv, bn in _declared_pairs(module)
            if _foldable(conv, bn) and placed[id(conv)] == placed[id(bn)] == 1]


def _folded_weights(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.rsqrt(bn.running_var.float() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.float()
    shift = -bn.running_mean.float() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.float()
    if conv.bias is not None:
        shift = shift + conv.bias.float() * scale
    weight = conv.weight * scale.view(-1, 1, 1, 1).to(conv.weight.dtype)
    if conv.weight.is_contiguous(memory_format=torch.channels_last):
        weight = weight.contiguous(memory_format=torch.channels_last)
    return weight, shift.to(conv.weight.dtype)


def _folded_conv(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def _passed_through(x: torch.Tensor) -> torch.Tensor:
    return x


@contextlib.contextmanager
def folded_batchnorm(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model``'s foldable conv + eval-mode BatchNorm pairs as single convolutions for the block.

    The weights are folded once on entry, so the model must not change inside the block (an attack's
    frozen, eval-mode model); on exit every module runs its own ``forward`` again. The outputs equal the
    unfolded model's up to float rounding. A ``torch.compile``d module is left alone: its traced graph
    would not see the swap.
    """
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):
        yield model
        return
    pairs = foldable_pairs(model)
    with torch.no_grad():
        for conv, bn in pairs:
            conv.forward = functools.partial(_folded_conv, conv, *_folded_weights(conv, bn))
            bn.forward = _passed_through
    try:
        yield model
    finally:
        for conv, bn in pairs:
            del conv.forward, bn.forward
