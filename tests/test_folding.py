"""BatchNorm folded into its convolution for an attack's passes: same function, only where the flow is declared."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from timm.models import resnet as timm_resnet
from torch import nn
from torchvision.models.resnet import BasicBlock

import robust_transfer.attack as attack_module
from robust_transfer import ThreatModel, create_model, pgd
from robust_transfer.folding import foldable_pairs, folded_batchnorm
from robust_transfer.train.distributed import convert_batchnorm


def _with_statistics(model: nn.Module, channels: int, side: int) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters, then eval mode."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average: a few batches set the statistics
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.5, 0.5, generator=generator)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, channels, side, side, generator=generator) * 2 - 0.5)
    return model.eval()


def _outputs_and_input_gradient(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    return out.detach(), grad


def _runs_its_own_forward(model: nn.Module) -> bool:
    return all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize(("arch", "channels", "side"), [("small_resnet", 1, 28), ("cifar_resnet18", 3, 32),
                                                        ("resnet18", 3, 64), ("mobilenet_v2", 3, 64),
                                                        ("timm:resnet18", 3, 64), ("timm:resnet26", 3, 64)])
def test_folded_model_computes_what_the_unfolded_one_does(arch, channels, side):
    torch.manual_seed(0)
    model = _with_statistics(create_model(arch, num_classes=5, in_channels=channels), channels, side)
    x = torch.rand(4, channels, side, side, generator=torch.Generator().manual_seed(1))
    out, grad = _outputs_and_input_gradient(model, x)
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    # Every BatchNorm of these networks follows its convolution directly: all of them fold.
    assert len(foldable_pairs(model)) == len(batchnorms)
    with folded_batchnorm(model):
        folded_out, folded_grad = _outputs_and_input_gradient(model, x)
        assert not _runs_its_own_forward(model)
    assert (folded_out - out).abs().max() <= 1e-4 * out.abs().max()
    # In norm: a ReLU input within rounding of zero, or a max-pool tie, may switch sides and move a few
    # gradient entries (a wrong scale or shift would be off by the order of the gradient itself).
    assert (folded_grad - grad).norm() <= 1e-2 * grad.norm()
    # Afterwards every module runs its own forward again and the model computes exactly what it did.
    assert _runs_its_own_forward(model)
    assert torch.equal(_outputs_and_input_gradient(model, x)[0], out)


class _Rewired(BasicBlock):
    """A subclass whose forward puts something between conv1 and bn1: torchvision's declaration no longer holds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x) * 2.0))
        return self.relu(self.bn2(self.conv2(out)) + x)


class _TimmStemRewired(timm_resnet.ResNet):
    """timm's ResNet with a forward_features that scales the stem conv's output before bn1."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x) * 2.0)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class _Undeclared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class _Declared(_Undeclared):
    batchnorm_after = {"conv": "bn"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class _InheritsDeclaration(_Declared):
    """Declared by the parent, but this forward shifts conv's output first: the declaration must not apply."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + 1.0)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_data_parallel_batchnorms_fold_in_eval_mode(device):
    # A torchrun run attacks its plain module, whose BatchNorms are the cross-process kind (SyncBatchNorm for a
    # GPU run, converted here without a GPU): in eval mode both are BatchNorm2d's affine map.
    torch.manual_seed(0)
    model = _with_statistics(create_model("small_resnet", num_classes=5, in_channels=1), 1, 28)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        expected = model(x)
    model = convert_batchnorm(model, torch.device(device)).eval()
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert len(foldable_pairs(model)) == 9
    with torch.no_grad(), folded_batchnorm(model):
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_only_pairs_whose_flow_is_declared_fold():
    torch.manual_seed(0)
    assert foldable_pairs(_with_statistics(_Rewired(4, 4), 4, 8)) == []
    assert foldable_pairs(_with_statistics(_Undeclared(), 3, 8)) == []
    declared = _with_statistics(_Declared(), 3, 8)
    assert foldable_pairs(declared) == [(declared.conv, declared.bn)]
    assert foldable_pairs(_with_statistics(_InheritsDeclaration(), 3, 8)) == []
    # Rewriting timm's forward_features (forward is timm's own) drops the stem pair; the blocks still fold.
    stem_rewired = _with_statistics(_TimmStemRewired(timm_resnet.BasicBlock, [1, 1, 1, 1], num_classes=3), 3, 32)
    pairs = foldable_pairs(stem_rewired)
    assert (stem_rewired.conv1, stem_rewired.bn1) not in pairs
    assert len(pairs) == len([m for m in stem_rewired.modules() if isinstance(m, nn.BatchNorm2d)]) - 1
    # A module placed twice runs twice: folding it for one place would be wrong at the other.
    conv = nn.Conv2d(3, 3, 3, padding=1)
    shared = _with_statistics(nn.Sequential(conv, nn.BatchNorm2d(3), conv, nn.BatchNorm2d(3)), 3, 8)
    assert foldable_pairs(shared) == []
    # Each of these models still computes the same function inside the block.
    for model, channels, side in ((_Rewired(4, 4), 4, 8), (_InheritsDeclaration(), 3, 8), (shared, 3, 8),
                                  (stem_rewired, 3, 32)):
        model = _with_statistics(model, channels, side)
        x = torch.rand(2, channels, side, side)
        with torch.no_grad():
            expected = model(x)
            with folded_batchnorm(model):
                assert torch.allclose(model(x), expected, atol=1e-5)


def test_training_mode_hooks_and_compiled_models_are_left_alone():
    model = _with_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()), 3, 8)
    model.train()  # batch statistics: not a fixed affine map
    assert foldable_pairs(model) == []
    model.eval()
    seen = []
    model[1].register_forward_hook(lambda module, args, out: seen.append(out))
    assert foldable_pairs(model) == []  # the hook must see the BatchNorm's own output
    x = torch.rand(2, 3, 8, 8)
    with folded_batchnorm(model), torch.no_grad():
        model(x)
    assert len(seen) == 1
    plain = _with_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), 3, 8)
    compiled = torch.compile(plain)  # not run: its traced graph would not see a swapped forward
    with folded_batchnorm(compiled):
        assert _runs_its_own_forward(plain)


def test_an_error_inside_the_block_still_restores_every_forward():
    model = _with_statistics(create_model("small_resnet", num_classes=3, in_channels=1), 1, 28)
    with pytest.raises(RuntimeError, match="inside"), folded_batchnorm(model):
        raise RuntimeError("inside")
    assert _runs_its_own_forward(model)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_through_folded_batchnorm_finds_the_unfolded_attack(norm):
    torch.manual_seed(0)
    model = _with_statistics(create_model("small_resnet", num_classes=10, in_channels=1), 1, 28)
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(3))
    threat = ThreatModel(norm, 1.0 if norm == "l2" else 8 / 255)

    def attacked() -> torch.Tensor:
        return pgd(model, x, y, threat, steps=5, generator=torch.Generator().manual_seed(4))

    folded = attacked()
    with mock.patch.object(attack_module, "folded_batchnorm", contextlib.nullcontext):
        reference = attacked()
    assert _runs_its_own_forward(model)
    # Same steps from the same start: the iterates agree to float rounding (a sign flip of a near-zero
    # gradient coordinate moves an Linf step, hence the small share allowed to differ).
    differs = (folded - reference).abs() > 1e-4
    assert differs.float().mean() < 0.01
    assert threat.norm_of(folded - x).max() <= threat.eps + 1e-5
