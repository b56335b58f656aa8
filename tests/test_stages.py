"""Stages, freezing, train mode and new heads (robust_transfer.models.stages) for every registered architecture.

Structure-only checks build the models on the meta device (no weights, no arithmetic); the optimisation
steps use real small_resnet and resnet18 on 32 px inputs.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robust_transfer.errors import RobustTransferError
from robust_transfer.models import (
    FrozenInfo,
    MLPHead,
    ModelSpec,
    create_model,
    freeze_stages,
    head_name,
    list_architectures,
    load_model,
    num_stages,
    replace_head,
    save_model,
    set_train_mode,
    with_normalization,
)
from robust_transfer.models.stages import _blocks, _family, _resolution_stages, stages

RESNET = [["conv1", "bn1", "layer1"], ["layer2"], ["layer3"], ["layer4"]]


def _features(indices) -> list[str]:
    return [f"features.{i}" for i in indices]


def _vgg_block(start: int, convs: int) -> list[str]:  # conv, bn, relu per layer: the conv and bn have parameters
    return _features(i for c in range(convs) for i in (start + 3 * c, start + 3 * c + 1))


EXPECTED = {
    "resnet18": RESNET,
    "resnet50": RESNET,
    "wide_resnet50_2": RESNET,
    "wide_resnet50_4": RESNET,
    "resnext50_32x4d": RESNET,
    "cifar_resnet18": RESNET,
    "cifar_resnet50": RESNET,
    "small_resnet": RESNET[:3],
    "small_resnet_w2": RESNET[:3],
    "small_resnet_w4": RESNET[:3],
    "densenet161": [
        ["features.conv0", "features.norm0", "features.denseblock1", "features.transition1"],
        ["features.denseblock2", "features.transition2"],
        ["features.denseblock3", "features.transition3"],
        ["features.denseblock4", "features.norm5"],
    ],
    "mobilenet_v2": [_features(range(0, 4)), _features(range(4, 7)), _features(range(7, 14)),
                     _features(range(14, 19))],
    "mnasnet1_0": [[f"layers.{i}" for i in (0, 1, 3, 4, 6, 7, 8)], ["layers.9"], ["layers.10", "layers.11"],
                   [f"layers.{i}" for i in range(12, 16)]],
    "shufflenet_v2_x1_0": [["conv1"], ["stage2"], ["stage3"], ["stage4", "conv5"]],
    "vgg16_bn": [_vgg_block(0, 2) + _vgg_block(7, 2), _vgg_block(14, 3), _vgg_block(24, 3),
                 _vgg_block(34, 3) + ["classifier.0", "classifier.3"]],
}
HEADS = {"densenet161": "classifier", "mobilenet_v2": "classifier.1", "mnasnet1_0": "classifier.1",
         "vgg16_bn": "classifier.6"}
ARCHS = list_architectures()


def _meta(arch: str, num_classes: int = 10):
    with torch.device("meta"):
        return create_model(arch, num_classes)


def _stage_index(table: list[list[str]], name: str) -> int | None:
    """Which stage (0-based) a parameter / module name belongs to; None for the head."""
    for index, stage in enumerate(table):
        if any(name == block or name.startswith(block + ".") for block in stage):
            return index
    return None


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_every_registered_architecture_has_an_expected_table():
    assert set(EXPECTED) == set(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
def test_stages_cover_everything_but_the_head_disjointly_in_forward_order(arch):
    model = _meta(arch)
    table = stages(model)
    assert table == EXPECTED[arch]
    assert num_stages(model) == len(table) == (3 if arch.startswith("small_resnet") else 4)
    head = head_name(model)
    assert head == HEADS.get(arch, "fc")
    inner = model.model
    # Disjoint and complete: every parameter and buffer is in exactly one stage, or in the head.
    for name, _ in [*inner.named_parameters(), *inner.named_buffers()]:
        owners = [i for i, stage in enumerate(table) for block in stage if _under(name, block)]
        assert len(owners) == (0 if _under(name, head) else 1), name
    # Forward order: the layers with parameters run stage by stage, the head last.
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda *_, n=n: order.append(n)) for n, m in inner.named_modules()
             if any(True for _ in m.parameters(recurse=False))]
    model.eval()(torch.zeros(1, 3, 64, 64, device="meta"))
    for hook in hooks:
        hook.remove()
    seen = [_stage_index(table, name) for name in order]
    seen = [len(table) if s is None else s for s in seen]
    assert seen == sorted(seen) and seen[-1] == len(table)
    assert set(seen) == set(range(len(table) + 1))
    # Within a stage, the names are listed in the order they run.
    first_run = {}
    for name in order:
        for stage in table:
            for block in stage:
                if _under(name, block):
                    first_run.setdefault(block, len(first_run))
    for stage in table:
        assert [first_run[block] for block in stage] == sorted(first_run[block] for block in stage)


@pytest.mark.parametrize("arch", ARCHS)
def test_freeze_stages_freezes_exactly_stages_one_to_k(arch):
    model = _meta(arch)
    table = stages(model)
    head = head_name(model)
    total = sum(p.numel() for p in model.parameters())
    for k in [len(table), 0, *range(1, len(table))]:  # from "all" back to fewer: freezing is not cumulative
        info = freeze_stages(model, k)
        assert isinstance(info, FrozenInfo)
        assert (info.k, info.num_stages, info.head) == (k, len(table), head)
        assert info.frozen_modules == tuple(name for stage in table[:k] for name in stage)
        frozen = 0
        for name, parameter in model.model.named_parameters():
            index = _stage_index(table, name)
            expect_frozen = index is not None and index < k
            assert parameter.requires_grad is not expect_frozen, (k, name)
            frozen += parameter.numel() if expect_frozen else 0
            if _under(name, head):
                assert parameter.requires_grad
        assert (info.frozen, info.trainable) == (frozen, total - frozen)
    assert info.trainable > 0 and info.frozen > 0


def test_a_bad_k_names_the_range_and_the_stages():
    model = _meta("small_resnet")
    for k in (-1, 4, 1.5, True, "2"):
        with pytest.raises(RobustTransferError, match="small_resnet") as error:
            freeze_stages(model, k)
        message = str(error.value)
        assert "0 to 3" in message and "1: conv1 bn1 layer1; 2: layer2; 3: layer3" in message, message
        assert "'fc'" in message
    assert all(p.requires_grad for p in model.parameters())  # nothing changed
    long_stage = r"1: features\.0 \.\. features\.11 \(8 modules\); 2: "
    with pytest.raises(RobustTransferError, match=r"vgg16_bn: choose k from 0 to 4 .*" + long_stage):
        freeze_stages(_meta("vgg16_bn"), 5)


def _real(arch: str, num_classes: int = 10):
    torch.manual_seed(0)
    return create_model(arch, num_classes)


def _bn_names(model, frozen_modules) -> tuple[set[str], set[str]]:
    frozen, free = set(), set()
    for name, module in model.model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            (frozen if any(_under(name, block) for block in frozen_modules) else free).add(name)
    return frozen, free


@pytest.mark.parametrize(("arch", "k"), [("small_resnet", 1), ("resnet18", 2)])
@pytest.mark.parametrize("train_frozen_batchnorm", [False, True])
def test_one_optimisation_step_changes_only_what_is_trainable(arch, k, train_frozen_batchnorm):
    model = _real(arch)
    info = freeze_stages(model, k, train_frozen_batchnorm=train_frozen_batchnorm)
    set_train_mode(model, True, info)
    frozen_bn, free_bn = _bn_names(model, info.frozen_modules)
    assert frozen_bn and free_bn
    modules = dict(model.model.named_modules())
    assert all(modules[n].training is train_frozen_batchnorm for n in frozen_bn)
    assert all(modules[n].training for n in free_bn) and model.training and model.model.fc.training

    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)  # all of them
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32, generator=generator), torch.tensor([0, 1])
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    after = model.state_dict()

    parameters = {n for n, _ in model.named_parameters()}
    for key in before:
        inner_name = key.removeprefix("model.")
        in_frozen_stage = key.startswith("model.") and any(_under(inner_name, b) for b in info.frozen_modules)
        changed = not torch.equal(before[key], after[key])
        if key.startswith("normalize."):
            assert not changed, key
        elif key in parameters:
            assert changed is not in_frozen_stage, key  # frozen weights never move; all trainable ones do
        else:  # BatchNorm running statistics and counters
            assert changed is (not in_frozen_stage or train_frozen_batchnorm), key
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)

    set_train_mode(model, False, info)
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("arch", ARCHS)
def test_replace_head_gives_the_new_class_count(arch):
    model = _meta(arch)
    table, head = stages(model), head_name(model)
    x = torch.zeros(2, 3, 64, 64, device="meta")

    assert replace_head(model, 7) is model
    new = model.model.get_submodule(head)
    assert type(new) is nn.Linear and new.out_features == 7 and new.weight.is_meta
    assert model.spec.num_classes == 7 and model.spec.arch == arch
    assert model.eval()(x).shape == (2, 7)

    replace_head(model, 3, hidden=[32, 16])
    mlp = model.model.get_submodule(head)
    assert isinstance(mlp, MLPHead) and [m.out_features for m in mlp if isinstance(m, nn.Linear)] == [32, 16, 3]
    assert head_name(model) == head and stages(model) == table  # the hidden layers belong to the head
    assert model(x).shape == (2, 3) and model.spec.num_classes == 3


def test_an_mlp_head_trains_whole_in_fixed_feature_mode_and_can_be_replaced():
    model = _real("small_resnet")
    old_fc = model.model.fc
    replace_head(model, 5, hidden=(16,))
    assert [type(m) for m in model.model.fc] == [nn.Linear, nn.ReLU, nn.Linear]
    assert model.model.fc[0].in_features == old_fc.in_features
    info = freeze_stages(model, num_stages(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.fc.0.weight", "model.fc.0.bias", "model.fc.2.weight", "model.fc.2.bias"}
    assert info.trainable == sum(p.numel() for p in model.model.fc.parameters())
    set_train_mode(model, True, info)
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    logits = model(torch.rand(2, 3, 28, 28))
    assert logits.shape == (2, 5)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.model.fc.parameters())

    replace_head(model, 4)  # an MLP head is replaced as a whole
    assert type(model.model.fc) is nn.Linear and model.model.fc.in_features == old_fc.in_features
    assert model.model.fc.weight.requires_grad and model.spec.num_classes == 4


def test_an_mlp_head_is_in_the_spec_and_saves_and_reloads(tmp_path):
    model = _real("small_resnet")
    replace_head(model, 5, hidden=(16, 8))
    assert model.spec.head_hidden == (16, 8) and model.spec.to_dict()["head_hidden"] == [16, 8]
    path = save_model(model, tmp_path / "mlp")
    loaded = load_model(path)
    assert loaded.spec == model.spec and isinstance(loaded.model.fc, MLPHead)
    x = torch.rand(3, 3, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x))
    # create_model builds the same head from the spec alone.
    rebuilt = create_model("small_resnet", 5, 3, head_hidden=(16, 8))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}

    replace_head(model, 4)  # back to a single Linear: the spec forgets the hidden layers
    assert model.spec.head_hidden == () and "head_hidden" not in model.spec.to_dict()


def test_a_spec_without_head_hidden_reads_as_a_plain_head():
    old = {"arch": "resnet18", "num_classes": 10, "in_channels": 3, "mean": [0.5] * 3, "std": [0.5] * 3}
    spec = ModelSpec.from_dict(old)
    assert spec.head_hidden == () and spec.to_dict() == old  # files written before the field are unchanged
    assert ModelSpec.from_dict({**old, "head_hidden": [64]}).head_hidden == (64,)
    for bad in (0, [0], "64", [2.5]):
        with pytest.raises(RobustTransferError, match="head"):
            ModelSpec.from_dict({**old, "head_hidden": bad})


def test_replace_head_rejects_bad_sizes():
    model = _meta("resnet18")
    for num_classes, hidden in [(0, ()), (2.5, ()), (3, (0,)), (3, (8, -1))]:
        with pytest.raises(RobustTransferError):
            replace_head(model, num_classes, hidden)
    assert model.model.fc.out_features == 10


class Custom(nn.Module):
    """A model outside the registry: it gets its top-level children as stages."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(4, 1, 1))
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.body(self.act(self.stem(x)) + self.token)))


def test_unknown_models_fall_back_to_their_top_level_children(tiny_net):
    model = with_normalization(Custom(), 0.5, 0.5)
    assert model.spec.arch == "custom"
    assert stages(model) == stages(model.model) == [["token", "stem"], ["body"], ["classifier.1"]]
    assert head_name(model) == "classifier.3"
    info = freeze_stages(model, 3)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"model.classifier.3.weight",
                                                                           "model.classifier.3.bias"}
    info = freeze_stages(model, 1)
    assert not model.model.token.requires_grad and model.model.body[0].weight.requires_grad
    set_train_mode(model, True, info)
    assert model.model.body[1].training
    assert stages(tiny_net) == [["features"]] and head_name(tiny_net) == "fc"
    with pytest.raises(RobustTransferError, match="0 to 1"):
        freeze_stages(tiny_net, 2)


def test_the_probe_leaves_the_model_alone_and_a_real_probe_agrees():
    model = _real("small_resnet").train()
    before = copy.deepcopy(model.state_dict())
    table = stages(model)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    inner = model.model
    blocks = _blocks(inner, head_name(inner), _family(inner))
    assert _resolution_stages(inner, blocks, meta=False) == table
    assert all(m.training for m in model.modules())


def test_wrapped_models_and_bare_classifiers_give_the_same_stages():
    model = _real("small_resnet")
    assert stages(nn.DataParallel(model)) == stages(model.model) == stages(model)
    info = freeze_stages(nn.DataParallel(model), 1)
    assert not model.model.layer1[0].conv1.weight.requires_grad and model.model.layer2[0].conv1.weight.requires_grad
    set_train_mode(nn.DataParallel(model), True, info)
    assert not model.model.bn1.training and model.model.layer2[0].bn1.training
    with pytest.raises(RobustTransferError, match="not part of this model"):
        set_train_mode(_real("resnet18"), True, FrozenInfo(1, 3, ("nonexistent",), 0, 0, "fc"))
