"""Any model as a source: timm architectures, a user's own nn.Module, and today's robust ImageNet checkpoints.

Each source goes the whole way a user takes it: build or wrap, evaluate, save, load (the same logits),
transfer fixed, full and partial. Checkpoints of other projects are built here from models with random
weights and saved the way those projects save them; the references they are compared with are written
here too, from the projects' descriptions, not from our code.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict

import pytest
import timm
import torch
from torch import nn

from robust_transfer.cli import main
from robust_transfer.errors import RobustTransferError
from robust_transfer.evaluation import evaluate
from robust_transfer.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    create_model,
    freeze_stages,
    head_name,
    load_model,
    num_stages,
    save_model,
    with_normalization,
)
from robust_transfer.models.stages import stages
from robust_transfer.threat import ThreatModel
from robust_transfer.transfer import transfer
from robust_transfer.transfer.features import feature_extractor
from robust_transfer.zoo import MANIFEST, import_model
from tests.user_models import TinyCNN, tiny_cnn

VIT = "timm:vit_tiny_patch16_224"
CONVNEXT = "timm:convnext_atto"
BUILDER = "tests.user_models:tiny_cnn"


def _vit():
    return create_model(VIT, num_classes=10, in_channels=1, img_size=8, patch_size=2)


def _convnext():
    return create_model(CONVNEXT, num_classes=10, in_channels=1)


def _user():
    return with_normalization(tiny_cnn(), 0.5, 0.25, builder=BUILDER)


# source -> (constructor, image size it runs at)
SOURCES = {"vit": (_vit, 8), "convnext": (_convnext, 32), "user": (_user, 8)}


def _inner_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.state_dict().items()}


@pytest.mark.parametrize("name", list(SOURCES))
def test_a_source_goes_through_evaluate_save_load_and_every_transfer_mode(name, tmp_path):
    build, size = SOURCES[name]
    torch.manual_seed(0)
    model = build().eval()
    x, y = torch.rand(6, 1, size, size), torch.arange(6) % 10
    result = evaluate(model, (x, y), ThreatModel("linf", 8 / 255), steps=3)
    assert result.n == 6 and result.robust_acc <= result.clean_acc

    path = save_model(model, tmp_path / "source")
    loaded = load_model(path)
    assert loaded.spec == model.spec
    assert torch.equal(loaded(x), model(x))

    source_state = _inner_state(loaded)
    settings = dict(dataset="digits", image_size=size, epochs=1, lrs=[0.05], refit=False, train_examples=256,
                    batch_size=64, cache_dir=str(tmp_path / "cache"), progress=False, precision="fp32")
    partial = min(2, num_stages(loaded) - 1)
    for mode, frozen in (("fixed", num_stages(loaded)), ("full", 0), (f"partial:{partial}", partial)):
        # the in-memory path for the fixed mode, the file for the others: users do both
        out_dir = str(tmp_path / mode.replace(":", "-"))
        run = (transfer(model=model, mode=mode, out_dir=out_dir, **settings) if mode == "fixed"
               else transfer(source=str(path), mode=mode, out_dir=out_dir, **settings))
        assert 0.0 <= run.test_score <= 1.0
        reloaded = load_model(run.model_path)
        assert torch.equal(reloaded(x), run.model(x)), mode
        after, kept, head = _inner_state(reloaded), _stage_keys(reloaded, frozen), _head_keys(reloaded)
        changed = {k for k in source_state if k not in head and not torch.equal(after[k], source_state[k])}
        assert not changed & kept, f"{mode}: frozen weights changed: {sorted(changed & kept)[:3]}"
        assert (not changed) == (mode == "fixed"), f"{mode}: trainable weights did not move"


def _stage_keys(model, k: int) -> set[str]:
    """State-dict keys (of the classifier) in stages 1..k."""
    blocks = [block for stage in stages(model)[:k] for block in stage]
    return {key for key in model.model.state_dict() if any(key == b or key.startswith(b + ".") for b in blocks)}


def _head_keys(model) -> set[str]:
    head = head_name(model)
    return {key for key in model.model.state_dict() if key == head or key.startswith(head + ".")}


# --- stages and heads, declared by timm -------------------------------------------------------------------------


def test_timm_stages_come_from_feature_info_and_cover_everything_but_the_head():
    with torch.device("meta"):
        vit, convnext = _vit(), _convnext()
    blocks = [f"blocks.{i}" for i in range(12)]
    assert stages(vit) == [["cls_token", "pos_embed", "patch_embed", *blocks[:3]], blocks[3:6], blocks[6:9],
                           [*blocks[9:], "norm"]]
    assert stages(convnext) == [["stem", "stages.0"], ["stages.1"], ["stages.2"], ["stages.3", "head.norm"]]
    for model, head in ((vit, "head"), (convnext, "head.fc")):
        assert head_name(model) == head
        info = freeze_stages(model, num_stages(model))  # fixed-feature: only the head trains
        trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
        assert trainable == {f"{head}.weight", f"{head}.bias"} and info.trainable > 0


@pytest.mark.parametrize("build", [_vit, _convnext], ids=["vit-cls-token", "convnext-pooled"])
def test_fixed_features_are_what_the_models_own_head_reads(build):
    torch.manual_seed(0)
    model = build().eval()
    size = 8 if build is _vit else 32
    x = torch.rand(3, 1, size, size)
    with torch.no_grad():
        expected = model.model.forward_head(model.model.forward_features(model.normalize(x)), pre_logits=True)
        assert torch.allclose(feature_extractor(model)(x), expected, atol=1e-6)


def test_timm_image_size_follows_the_data_for_fixed_size_architectures():
    with torch.device("meta"):
        vit = create_model(VIT, num_classes=10, image_size=32, patch_size=4)
        convnext = create_model(CONVNEXT, num_classes=10, image_size=32)
    assert vit.spec.options == {"img_size": 32, "patch_size": 4} and convnext.spec.options == {}
    assert create_model(CONVNEXT).spec.mean == tuple(timm.get_pretrained_cfg("convnext_atto").mean)



# --- checkpoints of today's robust models, saved as their projects save them -----------------------------------


class RobustBenchNormalizer(nn.Module):
    """RobustBench's input normaliser: buffers ``mean`` and ``std`` shaped [1, 3, 1, 1]."""

    def __init__(self, mean, std) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.as_tensor(std).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def _robustbench_model(timm_name: str, mean, std) -> nn.Module:
    torch.manual_seed(1)
    inner = timm.create_model(timm_name, pretrained=False)
    return nn.Sequential(OrderedDict([("normalize", RobustBenchNormalizer(mean, std)), ("model", inner)])).eval()


def test_a_robustbench_checkpoint_imports_with_its_own_normalisation_and_logits(tmp_path):
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)  # not ImageNet's: proves they come from the file
    reference = _robustbench_model("convnext_atto", mean, std)
    path = tmp_path / "robustbench.pt"
    torch.save(reference.state_dict(), path)
    record = import_model(path, "my_robustbench_model", model_dir=tmp_path / "zoo", arch=CONVNEXT)
    model = load_model("my_robustbench_model", model_dir=tmp_path / "zoo")
    assert (record["arch"], record["normalization"]) == (CONVNEXT, "file")
    assert model.spec.mean == pytest.approx(mean) and model.spec.std == pytest.approx(std)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)


def test_an_ares_checkpoint_by_its_zoo_name_gets_the_manifests_architecture_and_preprocessing(tmp_path):
    entry = MANIFEST["ARES_ResNet50_AT"]
    torch.manual_seed(2)
    inner = timm.create_model("resnet50", pretrained=False).eval()
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    torch.save(inner.state_dict(), zoo / entry.filename)  # ARES: a flat timm state dict, normalised outside
    model = load_model("ARES_ResNet50_AT", model_dir=zoo)
    assert (model.spec.arch, model.spec.mean, model.spec.std) == ("timm:resnet50", IMAGENET_MEAN, IMAGENET_STD)
    assert model.metadata["threat"] == {"norm": "linf", "eps": 4 / 255}
    assert model.metadata["preprocessing"] == {"resize": 256, "crop": 224, "interpolation": "bilinear"}
    x = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), inner((x - mean) / std), atol=1e-5)


class ReferenceLayerNorm(nn.Module):
    """LayerNorm over channels of NCHW maps, eps 1e-6, as the ConvStem paper's code has it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(channels)), nn.Parameter(torch.randn(channels))

    def forward(self, x):
        return nn.functional.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, 1e-6
                                        ).permute(0, 3, 1, 2)


class ReferenceConvStem(nn.Module):
    """ConvNeXt-T's ConvStem as Singh et al. describe it: conv 3->48 and 48->96, 3x3 stride 2, LayerNorm + GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 48, 3, 2, 1), ReferenceLayerNorm(48), nn.GELU(),
                                  nn.Conv2d(48, 96, 3, 2, 1), ReferenceLayerNorm(96), nn.GELU())

    def forward(self, x):
        return self.stem(x)


@pytest.mark.parametrize("prefix", ["", "module.base_model."], ids=["robustbench-copy", "training-checkpoint"])
def test_a_convstem_checkpoint_loads_by_its_zoo_name_with_no_normalisation(tmp_path, prefix):
    name = "Singh2023Revisiting_ConvNeXt-T-ConvStem"
    torch.manual_seed(3)
    reference = timm.create_model("convnext_tiny", pretrained=False)
    reference.stem = ReferenceConvStem()
    reference.eval()
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    torch.save({prefix + k: v for k, v in reference.state_dict().items()}, zoo / MANIFEST[name].filename)
    model = load_model(name, model_dir=zoo)
    assert model.spec.mean == (0.0,) * 3 and model.spec.std == (1.0,) * 3  # trained on raw [0, 1] inputs
    assert model.metadata["accuracies"]["imagenet_val"]["robust_acc"] == pytest.approx(0.4946)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-4)
    assert stages(model)[0][:2] == ["stem", "stages.0"]


def test_every_manifest_architecture_builds(tmp_path):
    for entry in MANIFEST.values():
        with torch.device("meta"):
            model = create_model(entry.arch, num_classes=1000, **entry.options)
        assert num_stages(model) == 4, entry.name


# --- a user's own module --------------------------------------------------------------------------------------


def test_a_builder_is_checked_when_recorded(tmp_path):
    with pytest.raises(RobustTransferError, match=r"do not fit .*TinyCNN.*features\.0\.weight"):
        with_normalization(TinyCNN(width=16), 0.5, 0.25, builder=BUILDER)
    wide = with_normalization(TinyCNN(width=16), 0.5, 0.25, builder=BUILDER, options={"width": 16})
    assert load_model(save_model(wide, tmp_path / "wide")).spec.options == {"width": 16}
    unbuilt = with_normalization(TinyCNN(), 0.5, 0.25)
    path = save_model(unbuilt, tmp_path / "later", builder=BUILDER)  # recorded at save time instead
    assert load_model(path).spec.arch == BUILDER


def test_a_timm_module_built_by_the_user_is_recognised():
    torch.manual_seed(0)
    wrapped = with_normalization(timm.create_model("convnext_atto", pretrained=False, num_classes=7), 0.5, 0.5)
    assert wrapped.spec.arch == CONVNEXT and wrapped.spec.num_classes == 7


# --- bad input: one line, exit 2 --------------------------------------------------------------------------------


def _one_line_error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_an_unknown_timm_name_lists_close_matches(capsys, tmp_path):
    with pytest.raises(RobustTransferError, match="close matches: .*timm:vit_tiny_patch16_224"):
        create_model("timm:vit_tiny_patch16")
    err = _one_line_error(["pretrain", "--arch", "timm:convnext_atoo", "--out-dir", str(tmp_path / "run")], capsys)
    assert "timm:convnext_atto" in err and not (tmp_path / "run").exists()


def test_weights_of_another_architecture_say_which_keys_do_not_fit(tmp_path, capsys):
    path = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    err = _one_line_error(["evaluate", str(path), "--arch", CONVNEXT, "--dataset", "digits"], capsys)
    assert "do not fit architecture 'timm:convnext_atto'" in err and "missing keys: model.stem.0.weight" in err
    assert "unexpected keys: model.bn1.bias" in err and "its weights fit 'resnet18'" in err


def test_a_module_that_cannot_be_rebuilt_says_how_to_make_it_reloadable(tmp_path, capsys):
    path = save_model(with_normalization(TinyCNN(), 0.5, 0.25), tmp_path / "mine")
    assert json.loads(path.with_suffix(".json").read_text())["class"] == "tests.user_models:TinyCNN"
    err = _one_line_error(["evaluate", str(path), "--dataset", "digits"], capsys)
    assert "builder='package.module:function'" in err and "builder='tests.user_models:TinyCNN'" in err
    with pytest.raises(RobustTransferError, match="with_normalization"):
        transfer(model=TinyCNN(), dataset="digits", out_dir=str(tmp_path / "t"))


# --- the command line ---------------------------------------------------------------------------------------------


def test_pretrain_and_transfer_a_timm_architecture_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "vit"
    assert main(["pretrain", "--dataset", "digits", "--arch", VIT, "--arch-option", "patch_size=2", "--method",
                 "fgsm-rs", "--eps", "4/255", "--norm", "linf", "--epochs", "1", "--batch-size", "64",
                 "--train-examples", "128", "--eval-examples", "32", "--eval-steps", "1", "--test-examples", "32",
                 "--test-steps", "2", "--no-progress", "--out-dir", str(run)]) == 0
    model = load_model(run / "model.safetensors")
    assert (model.spec.arch, model.spec.options) == (VIT, {"patch_size": 2, "img_size": 8})  # the data's size
    assert main(["transfer", str(run / "model.safetensors"), "--dataset", "digits", "--mode", "partial:3",
                 "--epochs", "1", "--lrs", "0.05", "--no-refit", "--train-examples", "128", "--no-progress",
                 "--precision", "fp32", "--eval-attack", "apgd", "--eval-norm", "linf", "--eval-eps", "4/255",
                 "--eval-steps", "2", "--eval-examples", "16", "--out-dir", str(tmp_path / "transfer")]) == 0
    record = json.loads((tmp_path / "transfer" / "result.json").read_text())
    assert record["selection"]["frozen_stages"] == 3 and record["source"]["arch"] == VIT
    assert record["robust"]["attack"] == "APGD-CE + APGD-T (2 steps), linf eps 0.0156863"
    capsys.readouterr()


def test_a_swin_checkpoint_in_the_original_layout_is_converted_by_timms_own_filter(tmp_path):
    torch.manual_seed(4)
    reference = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    old = {}
    for key, value in reference.state_dict().items():  # the original repository: downsampling ends a stage
        key = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        old[key.replace("head.fc.", "head.")] = value
    old["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    path = tmp_path / "swin.pth"
    torch.save({"model": old}, path)
    model = load_model(path, "timm:swin_tiny_patch4_window7_224", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    x = torch.rand(1, 3, 224, 224)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), reference((x - mean) / std), atol=1e-4)


def test_a_swin_model_with_computed_buffers_saves_and_reloads_to_the_same_logits(tmp_path):
    torch.manual_seed(5)
    model = create_model("timm:swin_tiny_patch4_window7_224", num_classes=3, image_size=32, window_size=4).eval()
    loaded = load_model(save_model(model, tmp_path / "swin"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
