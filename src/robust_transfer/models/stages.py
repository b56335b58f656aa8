"""Stages of a classifier, for partial transfer (freeze the first K stages), and new heads.

Salman et al. (2020) transfer in three modes: fixed-feature (only a new last layer trains),
full-network, and partial (the first K stages frozen; their code's ``freeze_level``). A *stage*
here is the run of blocks that works at one spatial resolution, ending at stride 4, 8, 16 and 32
for ImageNet networks. `stages` returns them as lists of submodule names relative to the
classifier (``model.model`` of a `NormalizedModel`); together they cover every module with
parameters or buffers except the classifier head. Modules without state (ReLU, pooling,
dropout) are not listed: they have nothing to freeze.

How stages are found, for the architecture families of the registry (recognised by class, so
subclasses such as `CifarResNet` are included):

1. the *blocks* are the classifier's children, with the containers named below opened one level
   (ResNets and ShuffleNet: none; DenseNet: ``features``; MobileNet-v2 and VGG: ``features`` and
   ``classifier``; MNASNet: ``layers`` and ``classifier``); the head is left out;
2. a forward pass of a 224 px probe on the meta device (shapes only: no arithmetic, no change to
   the model or its BatchNorm statistics) records the output resolution of every layer with
   parameters; a block's resolution is that of the last such layer it runs, so a block that ends
   in a pooling layer (a DenseNet transition) belongs to the resolution it computes at;
3. consecutive blocks at one resolution form a group (flat outputs such as VGG's fc6 and fc7
   join the group before them);
4. leading groups are merged until at most four remain (`MAX_STAGES`): the stem joins stage 1.

The result for each registered architecture (pinned by tests/test_stages.py):

=====================  =====================================================================
architecture           stages
=====================  =====================================================================
resnet18, resnet50,    1: conv1 bn1 layer1 | 2: layer2 | 3: layer3 | 4: layer4
wide_resnet50_2/_4,    (cifar_resnet*: the same names; their stem has stride 1)
resnext50_32x4d,
cifar_resnet18/50
small_resnet(_w2, _w4) 1: conv1 bn1 layer1 | 2: layer2 | 3: layer3
densenet161            1: features.conv0 norm0 denseblock1 transition1 | 2: features.denseblock2
                       transition2 | 3: features.denseblock3 transition3 | 4: features.denseblock4
                       norm5
mobilenet_v2           features[0:4] | features[4:7] | features[7:14] | features[14:19]
mnasnet1_0             layers[0:9] (stem, layers.8) | layers.9 | layers.10 layers.11 |
                       layers.12 .. layers.15 (the 1x1 conv and its BatchNorm included)
shufflenet_v2_x1_0     1: conv1 (maxpool has no parameters) | 2: stage2 | 3: stage3 |
                       4: stage4 conv5
vgg16_bn               1: conv blocks 1 and 2 (features.0 .. features.11) | 2: block 3
                       (features.14 .. .21) | 3: block 4 (.24 .. .31) | 4: block 5 (.34 .. .41)
                       and the hidden fully connected layers classifier.0 and classifier.3
=====================  =====================================================================

VGG16-bn has five resolutions; its first two blocks (pool1 and pool2 ends) are merged so that
its stages end at stride 4, 8, 16 and 32 like every other architecture. fc6 and fc7 are not
a stage of their own: they belong to stage 4, so ``k = 4`` still means "everything but the head".

timm models declare their stages when they are built (``feature_info``: the modules whose outputs are
feature maps, with their stride), so nothing is probed for them. A stage ends at the last declared
module of each stride; an isotropic model, whose declared blocks all share one stride (ViT, DeiT,
XCiT), is cut into four equal groups of blocks; more than four strides merge the leading ones, as
above. Everything registered before the first boundary (patch embedding, class token, position
embedding, stem) joins stage 1, everything after the last (final norms, the pooling head's norm)
joins the last stage, so ``k = num_stages`` still freezes everything but the classifier. A user's
module that declares ``feature_info`` the same way is read the same way. For example ConvNeXt:
``1: stem stages.0 | 2: stages.1 | 3: stages.2 | 4: stages.3 head.norm``; ViT-Tiny:
``1: cls_token pos_embed patch_embed blocks.0-2 | 2: blocks.3-5 | 3: blocks.6-8 | 4: blocks.9-11 norm``.

Any other classifier (a user's model) falls back to its top-level children, in registration
order, one stage per child with parameters or buffers (the child holding the head is opened so
the head itself stays out). Parameters and buffers held directly by the classifier (say a class
token) join stage 1 under their own names.

`freeze_stages` freezes stages 1..k: ``k = 0`` nothing, ``k = num_stages(model)`` everything but
the head. `set_train_mode` then keeps the BatchNorm layers of frozen stages in eval mode, so their
running statistics stay those of the source model; ``train_frozen_batchnorm=True`` restores the
paper's code's behaviour of updating them (its frozen layers stayed in train mode).
Other layers (dropout in VGG's frozen fc6/fc7) follow ``train`` as usual.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torchvision.models as tvm
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _NormBase
from torchvision.models.resnet import ResNet

from ..errors import RobustTransferError
from .normalization import NormalizedModel
from .small import SmallResNet
from .spec import check_positive_int
from .surgery import classifier_head, set_submodule

MAX_STAGES = 4
PROBE_SIZE = 224  # pixels, on the meta device: costs nothing, divides by 32 exactly
FALLBACK_PROBE_SIZE = 64  # a real forward pass, only when a model cannot run on the meta device

# Family -> containers opened into their children (the head's container is always opened).
_FAMILIES: tuple[tuple[type[nn.Module], tuple[str, ...]], ...] = (
    (ResNet, ()),
    (SmallResNet, ()),
    (tvm.ShuffleNetV2, ()),
    (tvm.DenseNet, ("features",)),
    (tvm.MobileNetV2, ("features", "classifier")),
    (tvm.MNASNet, ("layers", "classifier")),
    (tvm.VGG, ("features", "classifier")),
)


class MLPHead(nn.Sequential):
    """A head with hidden layers, as `replace_head` builds it: Linear, ReLU, ..., Linear.

    A plain `nn.Sequential` in its state-dict names; its class marks the whole MLP as the head,
    so `stages` and `freeze_stages` never count its hidden layers as part of the backbone.
    """


@dataclass(frozen=True)
class FrozenInfo:
    """What `freeze_stages` did.

    ``k`` of ``num_stages`` stages are frozen; ``frozen_modules`` are their module names (relative
    to the classifier); ``frozen`` and ``trainable`` count parameter elements (numel); ``head``
    is the head's name; ``train_frozen_batchnorm`` is read by `set_train_mode`.
    """

    k: int
    num_stages: int
    frozen_modules: tuple[str, ...]
    frozen: int
    trainable: int
    head: str
    train_frozen_batchnorm: bool = False


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _normalized(model: nn.Module) -> NormalizedModel | None:
    model = _unwrap(model)
    return model if isinstance(model, NormalizedModel) else None


def classifier_of(model: nn.Module) -> nn.Module:
    """The bare classifier: unwraps (Distributed)DataParallel, torch.compile and `NormalizedModel`."""
    model = _unwrap(model)
    return _unwrap(model.model) if isinstance(model, NormalizedModel) else model


def head_name(model: nn.Module) -> str:
    """The head's dotted name relative to the classifier: the last Linear, or the `MLPHead` around it."""
    inner = classifier_of(model)
    name, _ = classifier_head(inner)
    parts = name.split(".")
    for end in range(1, len(parts)):
        prefix = ".".join(parts[:end])
        if isinstance(inner.get_submodule(prefix), MLPHead):
            return prefix
    return name


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _own_tensors(module: nn.Module, prefix: str) -> list[str]:
    names = [n for n, _ in module.named_parameters(recurse=False)]
    names += [n for n, b in module.named_buffers(recurse=False) if b is not None]
    return [prefix + n for n in names]


def _blocks(module: nn.Module, head: str, opened: Sequence[str], prefix: str = "") -> list[str]:
    """Names of the blocks of ``module`` in registration order, ``opened`` containers and the head's ancestors
    opened, the head itself left out; tensors held directly by an opened module come first."""
    out = _own_tensors(module, prefix)
    for name, child in module.named_children():
        full = prefix + name
        if full == head:
            continue
        if head.startswith(full + ".") or full in opened:
            out += _blocks(child, head, (), full + ".")
        else:
            out.append(full)
    return out


def _family(inner: nn.Module) -> tuple[str, ...] | None:
    for cls, opened in _FAMILIES:
        if isinstance(inner, cls):
            return opened
    return None


def _probe_dtype(inner: nn.Module) -> torch.dtype:
    for tensor in inner.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.get_default_dtype()


def _in_channels(inner: nn.Module) -> int:
    for module in inner.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 3


def _layer_resolutions(inner: nn.Module, meta: bool = True) -> dict[str, tuple[int, tuple[int, ...] | None]]:
    """Module name -> (position in the forward pass, output H x W or None for non-image outputs), for every
    module that holds parameters itself; recorded by one probe forward pass in eval mode."""
    found: dict[str, tuple[int, tuple[int, ...] | None]] = {}
    calls = itertools.count()

    def hook(name: str):
        def record(_module, _inputs, output) -> None:
            size = tuple(output.shape[-2:]) if isinstance(output, torch.Tensor) and output.dim() == 4 else None
            found[name] = (next(calls), size)  # a module run twice counts where it ran last

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in inner.named_modules()
               if any(True for _ in m.parameters(recurse=False))]
    modes = [(m, m.training) for m in inner.modules()]
    inner.eval()
    try:
        size = PROBE_SIZE if meta else FALLBACK_PROBE_SIZE
        with torch.no_grad():
            if meta:
                state = {n: torch.empty_like(t, device="meta") for n, t in inner.state_dict(keep_vars=True).items()}
                probe = torch.zeros(1, _in_channels(inner), size, size, device="meta", dtype=_probe_dtype(inner))
                functional_call(inner, state, (probe,), strict=False)
            else:
                parameter = next(inner.parameters())
                inner(torch.zeros(1, _in_channels(inner), size, size, device=parameter.device,
                                  dtype=_probe_dtype(inner)))
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return found


def _resolution_stages(inner: nn.Module, blocks: list[str], meta: bool = True) -> list[list[str]]:
    layers = _layer_resolutions(inner, meta)

    def resolution(block: str) -> tuple[int, ...] | None:
        runs = [value for name, value in layers.items() if name == block or name.startswith(block + ".")]
        return max(runs)[1] if runs else None

    groups: list[list[str]] = []
    leading: list[str] = []
    current: tuple[int, ...] | None = None
    for block in blocks:
        target = _lookup(inner, block)
        if isinstance(target, torch.Tensor):  # a parameter held by the classifier itself: stage 1
            leading.append(block)
            continue
        if not _has_state(target):
            continue
        size = resolution(block)
        if not groups or (size is not None and size != current):
            groups.append([])
            current = size if size is not None else current
        groups[-1].append(block)
    if groups:
        groups[0][:0] = leading
    while len(groups) > MAX_STAGES:
        groups[0:2] = [groups[0] + groups[1]]
    return groups


def _lookup(inner: nn.Module, name: str) -> nn.Module | torch.Tensor:
    parent_name, _, leaf = name.rpartition(".")
    parent = inner.get_submodule(parent_name) if parent_name else inner
    target = getattr(parent, leaf)
    if not isinstance(target, (nn.Module, torch.Tensor)):
        raise AttributeError(f"{name!r} is neither a module nor a tensor of {type(inner).__name__}")
    return target


def _parameters(inner: nn.Module, names: Sequence[str]) -> Iterator[nn.Parameter]:
    for name in names:
        target = _lookup(inner, name)
        if isinstance(target, nn.Module):
            yield from target.parameters()
        elif isinstance(target, nn.Parameter):
            yield target


def declared_boundaries(inner: nn.Module) -> list[str]:
    """The modules that end each stage, from the model's own ``feature_info`` (timm's declaration); empty
    when the model declares none."""
    info = getattr(inner, "feature_info", None)
    if not isinstance(info, list) or not info or not all(isinstance(i, dict) and "module" in i for i in info):
        return []
    names = set(dict(inner.named_modules()))
    entries = [(str(i["module"]), i.get("reduction")) for i in info if str(i["module"]) in names]
    if not entries:
        return []
    ends = [name for index, (name, reduction) in enumerate(entries)
            if index + 1 == len(entries) or entries[index + 1][1] != reduction]
    if len(ends) == 1:  # isotropic (ViT, DeiT, XCiT): equal groups of blocks
        count = min(MAX_STAGES, len(entries))
        ends = [entries[round((i + 1) * len(entries) / count) - 1][0] for i in range(count)]
    return ends[-MAX_STAGES:]  # more strides than stages: the leading ones merge


def _walk(module: nn.Module, opened: set[str], prefix: str = "") -> list[str]:
    """Tensors held directly, then children in registration order; ``opened`` names are expanded."""
    out = _own_tensors(module, prefix)
    for name, child in module.named_children():
        full = prefix + name
        out += _walk(child, opened, full + ".") if full in opened else [full]
    return out


def _declared_stages(inner: nn.Module, head: str, ends: list[str]) -> list[list[str]]:
    def ancestors(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts))]

    opened = {a for name in [*ends, head] if name for a in ancestors(name)}
    table: list[list[str]] = [[]]
    remaining = list(ends)
    for block in _walk(inner, opened):
        if block == head:
            continue
        target = _lookup(inner, block)
        if isinstance(target, torch.Tensor) or _has_state(target):
            table[-1].append(block)
        if remaining and block == remaining[0]:
            remaining.pop(0)
            if remaining:
                table.append([])
    return [stage for stage in table if stage]


def stages(model: nn.Module) -> list[list[str]]:
    """The ordered stages of ``model`` (a `NormalizedModel` or a bare classifier).

    Each stage is a list of dotted names relative to the classifier, e.g. ``["conv1", "bn1",
    "layer1"]`` for stage 1 of a ResNet. The stages are disjoint, in forward order, and cover every
    module with parameters or buffers except the head (see the module docstring for the rule and
    the table for each architecture).
    """
    inner = classifier_of(model)
    try:
        head = head_name(inner)
    except RobustTransferError:  # no Linear layer: a backbone without a head
        head = ""
    ends = declared_boundaries(inner)
    if ends:
        return _declared_stages(inner, head, ends)
    opened = _family(inner)
    if opened is None:  # a model we do not know: its top-level children, one stage each
        table: list[list[str]] = []
        tensors: list[str] = []
        for block in _blocks(inner, head, ()):
            target = _lookup(inner, block)
            if isinstance(target, torch.Tensor):
                tensors.append(block)
            elif _has_state(target):
                table.append([block])
        if tensors:  # parameters and buffers held by the classifier itself: stage 1
            table[:1] = [tensors + (table[0] if table else [])]
        return table
    blocks = _blocks(inner, head, opened)
    try:
        return _resolution_stages(inner, blocks, meta=True)
    except Exception:  # an operation without a meta kernel, or data-dependent code: probe for real
        return _resolution_stages(inner, blocks, meta=False)


def num_stages(model: nn.Module) -> int:
    """How many stages `freeze_stages` can freeze (4 for the registry's ImageNet networks, 3 for small_resnet)."""
    return len(stages(model))


def _arch(model: nn.Module) -> str:
    wrapper = _normalized(model)
    return wrapper.spec.arch if wrapper is not None else type(classifier_of(model)).__name__


def _describe(table: list[list[str]]) -> str:
    def stage(names: list[str]) -> str:
        return " ".join(names) if len(names) <= 4 else f"{names[0]} .. {names[-1]} ({len(names)} modules)"

    return "; ".join(f"{i}: {stage(names)}" for i, names in enumerate(table, start=1))


def freeze_stages(model: nn.Module, k: int, *, train_frozen_batchnorm: bool = False) -> FrozenInfo:
    """Freeze stages 1..k of ``model``: their parameters get ``requires_grad=False``, all others ``True``.

    ``k = 0`` freezes nothing (full-network transfer), ``k = num_stages(model)`` everything but the
    head (fixed-feature transfer by fine-tuning). Pass the returned `FrozenInfo` to
    `set_train_mode` so the frozen BatchNorm layers keep their running statistics (unless
    ``train_frozen_batchnorm``, the paper's code's behaviour). The model is changed in place.
    """
    table = stages(model)
    inner = classifier_of(model)
    head = head_name(inner)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(table):
        raise RobustTransferError(
            f"cannot freeze {k!r} stages of {_arch(model)}: choose k from 0 to {len(table)} (0 freezes nothing, "
            f"{len(table)} everything but the head {head!r}); its stages are {_describe(table)}"
        )
    frozen_modules = tuple(name for stage in table[:k] for name in stage)
    frozen_ids = {id(p) for p in _parameters(inner, frozen_modules)}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) not in frozen_ids)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return FrozenInfo(k, len(table), frozen_modules, frozen, trainable, head, train_frozen_batchnorm)


def set_train_mode(model: nn.Module, train: bool, info: FrozenInfo) -> None:
    """``model.train(train)``, except that BatchNorm layers in frozen stages stay in eval mode.

    They then normalise with, and keep, the source model's running statistics. With
    ``info.train_frozen_batchnorm`` they train like the rest (their statistics keep updating, as in
    the paper's code); their weights stay frozen either way.
    """
    model.train(train)
    if not train or info.train_frozen_batchnorm:
        return
    inner = classifier_of(model)
    for name in info.frozen_modules:
        try:
            target = _lookup(inner, name)
        except AttributeError:
            raise RobustTransferError(
                f"{name!r} from freeze_stages is not part of this model; call freeze_stages on the model you train"
            ) from None
        if isinstance(target, nn.Module):
            for module in target.modules():
                if isinstance(module, _NormBase):
                    module.eval()


def replace_head(model: nn.Module, num_classes: int, hidden: Sequence[int] = ()) -> nn.Module:
    """Give ``model`` a freshly initialised head for ``num_classes`` classes, in place; returns ``model``.

    The head is an `nn.Linear` (default initialisation), or with ``hidden`` widths an `MLPHead`
    (Linear, ReLU, ..., Linear), as the paper's code allows with additional hidden layers. It
    replaces the old head at its own name (``fc``, ``classifier``, ``classifier.1``,
    ``classifier.6``, ...; an earlier `MLPHead` as a whole) on the old head's device and dtype.
    A `NormalizedModel`'s ``spec.num_classes`` and ``spec.head_hidden`` are updated, so
    `save_model` / `load_model` rebuild the same head.
    """
    num_classes = check_positive_int(num_classes, "num_classes")
    widths = [check_positive_int(width, "a hidden layer width") for width in hidden]
    inner = classifier_of(model)
    name = head_name(inner)
    old = inner.get_submodule(name)
    first = old if isinstance(old, nn.Linear) else next(m for m in old.modules() if isinstance(m, nn.Linear))
    sizes = [first.in_features, *widths, num_classes]
    factory = {"device": first.weight.device, "dtype": first.weight.dtype}
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        if layers:
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(fan_in, fan_out, **factory))
    set_submodule(inner, name, layers[0] if len(layers) == 1 else MLPHead(*layers))
    wrapper = _normalized(model)
    if wrapper is not None:
        wrapper.spec = dataclasses.replace(wrapper.spec, num_classes=num_classes, head_hidden=tuple(widths))
    return model
