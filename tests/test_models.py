"""Tests for robust_transfer.models: registry, normalisation, heads and the model file format."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from robust_transfer.errors import RobustTransferError
from robust_transfer.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ModelSpec,
    Normalize,
    NormalizedModel,
    classifier_head,
    create_model,
    first_conv,
    list_architectures,
    load_model,
    save_model,
    with_normalization,
)

HEADS = {
    "resnet18": "fc",
    "resnet50": "fc",
    "wide_resnet50_2": "fc",
    "wide_resnet50_4": "fc",
    "densenet161": "classifier",
    "mnasnet1_0": "classifier.1",
    "mobilenet_v2": "classifier.1",
    "resnext50_32x4d": "fc",
    "shufflenet_v2_x1_0": "fc",
    "vgg16_bn": "classifier.6",
    "cifar_resnet18": "fc",
    "cifar_resnet50": "fc",
    "small_resnet": "fc",
    "small_resnet_w2": "fc",
    "small_resnet_w4": "fc",
}
TORCHVISION = [a for a in HEADS if not a.startswith(("cifar_", "small_")) and a != "wide_resnet50_4"]


def _meta_model(arch: str, num_classes: int = 7, in_channels: int = 3) -> NormalizedModel:
    with torch.device("meta"):
        return create_model(arch, num_classes=num_classes, in_channels=in_channels)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _perturb_bn_stats(model: nn.Module, shape: tuple[int, ...]) -> None:
    """One train-mode forward so BatchNorm running stats differ from their initial values."""
    model.train()
    with torch.no_grad():
        model(torch.rand(*shape))
    model.eval()


# --- registry and architectures -------------------------------------------------------------


def test_registry_lists_every_architecture():
    assert list_architectures() == list(HEADS)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("arch", list(HEADS))
def test_every_architecture_builds_with_any_classes_and_channels(arch, in_channels):
    model = _meta_model(arch, num_classes=7, in_channels=in_channels)
    assert isinstance(model, NormalizedModel) and isinstance(model.normalize, Normalize)
    assert model.spec == ModelSpec(arch, 7, in_channels, model.spec.mean, model.spec.std)
    assert first_conv(model)[1].in_channels == in_channels
    assert model.normalize.mean.shape == (1, in_channels, 1, 1)
    size = 28 if arch.startswith("small_resnet") else 64
    out = model(torch.empty(2, in_channels, size, size, device="meta"))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("arch", list(HEADS))
def test_classifier_head_is_the_final_linear(arch):
    model = _meta_model(arch)
    name, head = classifier_head(model)
    assert name == HEADS[arch]
    assert isinstance(head, nn.Linear) and head.out_features == 7
    assert model.model.get_submodule(name) is head
    assert classifier_head(model.model)[0] == name  # works on the bare classifier too


def test_classifier_head_without_linear_is_a_clear_error():
    with pytest.raises(RobustTransferError, match="no nn.Linear"):
        classifier_head(nn.Conv2d(1, 2, 3))


@pytest.mark.parametrize(
    ("arch", "in_channels", "size"),
    [
        ("resnet18", 1, 32),
        ("resnet18", 3, 32),
        ("mobilenet_v2", 3, 32),
        ("mobilenet_v2", 1, 32),
        ("shufflenet_v2_x1_0", 3, 32),
        ("mnasnet1_0", 1, 32),
        ("cifar_resnet18", 3, 32),
        ("cifar_resnet18", 1, 32),
        ("small_resnet", 1, 28),
        ("small_resnet", 3, 28),
    ],
)
def test_forward_gives_finite_logits_of_the_right_shape(arch, in_channels, size):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.rand(2, in_channels, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_resnet50_state_dict_names_match_torchvision_exactly():
    with torch.device("meta"):
        ours = create_model("resnet50").model.state_dict()
        theirs = torchvision.models.resnet50(weights=None).state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


@pytest.mark.parametrize("arch", TORCHVISION)
def test_torchvision_architectures_keep_torchvision_names(arch):
    with torch.device("meta"):
        ours = create_model(arch, num_classes=7).model.state_dict()
        theirs = getattr(torchvision.models, arch)(weights=None, num_classes=7).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_wide_resnet50_4_is_twice_as_wide_as_wide_resnet50_2():
    wrn2, wrn4, rn50 = (
        _meta_model(a, num_classes=1000) for a in ("wide_resnet50_2", "wide_resnet50_4", "resnet50")
    )
    assert _n_params(wrn2) == 68_883_240  # torchvision's documented count for WRN-50-2
    # Inner 3x3 convs grow with width squared, the 1x1 convs linearly: between 2x and 4x WRN-50-2.
    assert 2 * _n_params(wrn2) < _n_params(wrn4) < 4 * _n_params(wrn2)
    assert wrn4.model.layer1[0].conv2.out_channels == 2 * wrn2.model.layer1[0].conv2.out_channels == 256
    assert wrn4.model.layer4[2].conv3.out_channels == rn50.model.layer4[2].conv3.out_channels == 2048


def test_small_nets_have_the_documented_shape():
    small = create_model("small_resnet", num_classes=10, in_channels=1)
    assert _n_params(small.model) == 308_074
    assert [name for name, _ in small.model.named_children()] == [
        "conv1", "bn1", "relu", "layer1", "layer2", "layer3", "avgpool", "fc",
    ]  # fmt: skip
    cifar = _meta_model("cifar_resnet18", num_classes=10)
    assert cifar.model.conv1.kernel_size == (3, 3) and cifar.model.conv1.stride == (1, 1)
    assert isinstance(cifar.model.maxpool, nn.Identity)
    with torch.device("meta"):
        tv = torchvision.models.resnet18(weights=None, num_classes=10)
    names = {k for k in cifar.model.state_dict() if not k.startswith("conv1.")}
    assert names == {k for k in tv.state_dict() if not k.startswith("conv1.")}


def test_default_statistics():
    assert _meta_model("resnet18").spec.mean == IMAGENET_MEAN
    assert _meta_model("resnet18").spec.std == IMAGENET_STD
    assert _meta_model("resnet18", in_channels=1).spec.mean == (0.5,)
    assert _meta_model("cifar_resnet18").spec.std == (0.5, 0.5, 0.5)
    with torch.device("meta"):
        custom = create_model("small_resnet", in_channels=2, mean=0.25, std=[0.1, 0.2])
    assert custom.spec.mean == (0.25, 0.25) and custom.spec.std == (0.1, 0.2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "resnet9000"}, "resnet18, resnet50, .*small_resnet"),
        ({"arch": "resnet18", "num_classes": 0}, "num_classes"),
        ({"arch": "resnet18", "in_channels": 2.5}, "in_channels"),
        ({"arch": "resnet18", "mean": [0.5, 0.5]}, "2 values but the model takes 3-channel"),
        ({"arch": "resnet18", "std": [1.0, 0.0, 1.0]}, "std must be > 0"),
    ],
)
def test_bad_create_model_arguments_are_clear_errors(kwargs, message):
    with pytest.raises(RobustTransferError, match=message), torch.device("meta"):
        create_model(**kwargs)


# --- normalisation --------------------------------------------------------------------------


def test_normalize_matches_a_manual_computation():
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    x = torch.rand(4, 3, 5, 6)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), (x - mean) / std)
    assert norm.mean.shape == norm.std.shape == (1, 3, 1, 1)
    assert set(norm.state_dict()) == {"mean", "std"}


def test_normalize_keeps_memory_format_and_dtype():
    norm = Normalize((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    x = torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    assert norm(x).is_contiguous(memory_format=torch.channels_last)
    assert norm(x.bfloat16()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(norm(x), norm(x.contiguous()))


def test_normalize_rejects_the_wrong_channel_count():
    with pytest.raises(RobustTransferError, match="3 channels"):
        Normalize(IMAGENET_MEAN, IMAGENET_STD)(torch.rand(1, 1, 4, 4))
    with pytest.raises(RobustTransferError, match="std has 1"):
        Normalize((0.5, 0.5), (0.5,))


def test_normalized_model_is_inner_model_on_normalised_input():
    torch.manual_seed(0)
    model = create_model(
        "small_resnet", num_classes=5, in_channels=3, mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1)
    )
    model.eval()
    x = torch.rand(3, 3, 28, 28)
    manual = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.3, 0.2, 0.1]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.model(manual))


@pytest.mark.parametrize(
    ("arch", "in_channels", "size"), [("small_resnet", 1, 28), ("cifar_resnet18", 3, 32)]
)
def test_bf16_autocast_channels_last_is_close_to_fp32(arch, in_channels, size):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_channels=in_channels)
    _perturb_bn_stats(model, (8, in_channels, size, size))
    x = torch.rand(8, in_channels, size, size)
    with torch.no_grad():
        reference = model(x)
        fast_model = model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast = fast_model(x.contiguous(memory_format=torch.channels_last))
    assert fast.dtype == torch.bfloat16
    relative = (fast.float() - reference).norm() / reference.norm()
    assert relative < 0.05, relative


def test_bf16_channels_last_training_step_gives_finite_input_gradients():
    torch.manual_seed(0)
    model = (
        create_model("small_resnet", num_classes=10, in_channels=1)
        .to(memory_format=torch.channels_last)
        .train()
    )
    x = torch.rand(16, 1, 28, 28).contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (16,)))
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# --- with_normalization ---------------------------------------------------------------------


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.head = nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_with_normalization_recognises_registered_architectures():
    with torch.device("meta"):
        wrapped = with_normalization(
            torchvision.models.resnet18(weights=None, num_classes=4), IMAGENET_MEAN, IMAGENET_STD
        )
    assert wrapped.spec == ModelSpec("resnet18", 4, 3, IMAGENET_MEAN, IMAGENET_STD)
    with torch.device("meta"):
        small = with_normalization(create_model("small_resnet", 10, in_channels=2).model, 0.5, 0.25)
    assert small.spec == ModelSpec("small_resnet", 10, 2, (0.5, 0.5), (0.25, 0.25))


def test_with_normalization_of_a_custom_model():
    wrapped = with_normalization(_Custom(), (0.5, 0.4), (0.2, 0.3))
    assert wrapped.spec == ModelSpec("custom", 6, 2, (0.5, 0.4), (0.2, 0.3))
    assert wrapped(torch.rand(2, 2, 5, 5)).shape == (2, 6)
    assert classifier_head(wrapped)[0] == "head"


def test_with_normalization_refuses_double_normalisation_and_a_wrong_arch():
    with torch.device("meta"):
        model = create_model("resnet18")
        with pytest.raises(RobustTransferError, match="normalise twice"):
            with_normalization(model, IMAGENET_MEAN, IMAGENET_STD)
        with pytest.raises(RobustTransferError, match="does not match architecture 'resnet50'"):
            with_normalization(model.model, IMAGENET_MEAN, IMAGENET_STD, arch="resnet50")


# --- save_model / load_model ----------------------------------------------------------------


@pytest.fixture
def saved_small(tmp_path) -> tuple[NormalizedModel, Path]:
    torch.manual_seed(0)
    model = create_model("small_resnet", num_classes=7, in_channels=1)
    _perturb_bn_stats(model, (4, 1, 28, 28))
    path = save_model(model, tmp_path / "small.safetensors", {"eps": 0.5, "recipe": {"epochs": 3}})
    return model, path


def test_round_trip_gives_identical_model_outputs_and_metadata(saved_small, tmp_path):
    model, path = saved_small
    assert path == tmp_path / "small.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.json", "small.safetensors"]  # no temp files
    loaded = load_model(path)
    assert isinstance(loaded, NormalizedModel) and not loaded.training
    assert loaded.spec == model.spec
    original, restored = model.state_dict(), loaded.state_dict()
    assert list(original) == list(restored)
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert all(p.requires_grad for p in loaded.parameters())
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    assert loaded.metadata["eps"] == 0.5 and loaded.metadata["recipe"] == {"epochs": 3}
    assert loaded.metadata["format"] == "robust-transfer/1"
    assert loaded.metadata["spec"] == model.spec.to_dict()
    document = json.loads(path.with_suffix(".json").read_text())
    assert list(document)[:3] == ["format", "spec", "sha256"]
    assert document["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_loaded_model_can_be_saved_over_its_own_file(saved_small):
    model, path = saved_small
    loaded = load_model(path)
    save_model(loaded, path, {"generation": 2})
    again = load_model(path)
    assert again.metadata["generation"] == 2 and "eps" not in again.metadata
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    )


def test_paths_without_suffix_and_json_paths_work(tmp_path):
    model = create_model("small_resnet", num_classes=3, in_channels=1)
    path = save_model(model, tmp_path / "runs" / "m.eps0.5")
    assert path.name == "m.eps0.5.safetensors" and path.with_suffix(".json").is_file()
    assert load_model(tmp_path / "runs" / "m.eps0.5").spec == model.spec
    assert load_model(path.with_suffix(".json")).spec == model.spec


def test_round_trip_of_torchvision_models_with_versioned_modules(tmp_path):
    # MNASNet refuses a state dict without module version metadata; load_model must supply it.
    torch.manual_seed(0)
    model = create_model("mnasnet1_0", num_classes=5, in_channels=1).eval()
    loaded = load_model(save_model(model, tmp_path / "mnas"))
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_saving_a_wrapped_torchvision_model_rebuilds_it(tmp_path):
    torch.manual_seed(0)
    model = with_normalization(
        torchvision.models.resnet18(weights=None, num_classes=3), IMAGENET_MEAN, IMAGENET_STD
    )
    loaded = load_model(save_model(nn.DataParallel(model), tmp_path / "rn18"))  # wrappers are stripped
    assert loaded.spec.arch == "resnet18"
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True)
    )


def test_a_custom_model_saves_but_cannot_be_rebuilt_by_name(tmp_path):
    path = save_model(with_normalization(_Custom(), 0.5, 0.5), tmp_path / "custom")
    with pytest.raises(RobustTransferError, match="custom architecture"):
        load_model(path)


def test_save_model_rejects_bad_input(tmp_path):
    with pytest.raises(RobustTransferError, match="with_normalization"):
        save_model(_Custom(), tmp_path / "x")
    model = create_model("small_resnet", 10, 1)
    with pytest.raises(RobustTransferError, match="reserved"):
        save_model(model, tmp_path / "x", {"sha256": "abc"})
    with pytest.raises(RobustTransferError, match="JSON-serialisable"):
        save_model(model, tmp_path / "x", {"tensor": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == []


def test_tampered_weights_fail_the_checksum(saved_small):
    _, path = saved_small
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same length, one weight changed
    path.write_bytes(bytes(data))
    with pytest.raises(RobustTransferError, match="checksum"):
        load_model(path)


def test_truncated_weights_are_a_clear_error(saved_small):
    _, path = saved_small
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(RobustTransferError, match="truncated"):
        load_model(path)


def test_corrupt_safetensors_with_a_matching_checksum_is_a_clear_error(saved_small):
    _, path = saved_small
    path.write_bytes(path.read_bytes()[:-1000])
    meta = path.with_suffix(".json")
    document = json.loads(meta.read_text())
    document["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    meta.write_text(json.dumps(document))
    with pytest.raises(RobustTransferError, match="corrupt"):
        load_model(path)


def test_weights_of_another_architecture_name_the_keys(saved_small):
    _, path = saved_small
    with pytest.raises(
        RobustTransferError, match=r"'cifar_resnet18'.*missing keys: model\.layer1\.1\.conv1"
    ) as info:
        load_model(path, arch="cifar_resnet18")
    assert "model.layer4" in str(info.value) and "wrong shapes" in str(info.value)


def test_edited_json_architecture_is_caught(saved_small):
    _, path = saved_small
    meta = path.with_suffix(".json")
    document = json.loads(meta.read_text())
    document["spec"]["arch"] = "resnet18"
    meta.write_text(json.dumps(document))
    with pytest.raises(RobustTransferError, match=r"'resnet18'.*(missing|unexpected) keys"):
        load_model(path)


def test_edited_json_class_count_names_the_wrong_shapes(saved_small):
    _, path = saved_small
    meta = path.with_suffix(".json")
    document = json.loads(meta.read_text())
    document["spec"]["num_classes"] = 10
    meta.write_text(json.dumps(document))
    with pytest.raises(
        RobustTransferError, match=r"wrong shapes: model\.fc\.weight \(file \[7, 128\], model \[10, 128\]\)"
    ):
        load_model(path)


def test_unknown_architecture_override_lists_valid_names(saved_small):
    _, path = saved_small
    with pytest.raises(RobustTransferError, match="choose one of: resnet18"):
        load_model(path, arch="alexnet")


def test_missing_files_name_the_path(saved_small, tmp_path):
    with pytest.raises(RobustTransferError, match=str(tmp_path / "nope.safetensors")):
        load_model(tmp_path / "nope.safetensors")
    _, path = saved_small
    os.remove(path.with_suffix(".json"))
    with pytest.raises(RobustTransferError, match="small.json not found"):
        load_model(path)


def test_foreign_json_is_a_clear_error(saved_small):
    _, path = saved_small
    path.with_suffix(".json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(RobustTransferError, match="not a robust-transfer model file"):
        load_model(path)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(HEADS))
def test_every_architecture_builds_for_real_and_runs(arch):
    """Real (not meta) construction and a forward pass for every architecture (slow: pytest -m slow)."""
    size = 28 if arch.startswith("small_resnet") else 64
    for in_channels in (1, 3):
        model = create_model(arch, num_classes=7, in_channels=in_channels).eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.rand(1, in_channels, size, size).contiguous(memory_format=torch.channels_last))
        assert out.shape == (1, 7) and torch.isfinite(out.float()).all()
