"""Transfer end to end on the embedded data: Fashion-MNIST source, Animal-MNIST / MNIST-5k / digits targets."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from robust_transfer.attack import Attack
from robust_transfer.cli import main
from robust_transfer.data import load_dataset
from robust_transfer.models import MLPHead, load_model
from robust_transfer.models.stages import replace_head, stages
from robust_transfer.train import PretrainConfig, pretrain
from robust_transfer.transfer import transfer
from robust_transfer.transfer.linear_probe import fit_linear_head, penalised_cross_entropy
from robust_transfer.transfer.metrics import score
from robust_transfer.transfer.predict import predict


@pytest.fixture(scope="session")
def source_path(tmp_path_factory):
    """A small robust source model trained briefly on real Fashion-MNIST."""
    out = tmp_path_factory.mktemp("source")
    run = pretrain(PretrainConfig(dataset="fashion-mnist", arch="small_resnet", method="pgd", eps=0.5, attack_steps=2,
                                  train_examples=512, epochs=1, batch_size=64, eval_examples=64, eval_steps=2,
                                  test_examples=64, test_steps=2, out_dir=str(out), progress=False))
    return str(run.model_path)


def _changed(before: dict, after: dict, prefix: str) -> bool:
    keys = [k for k in before if k.startswith(prefix) and before[k].is_floating_point()]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


def test_fixed_feature_fast_protocol_writes_a_record_and_reuses_features(tmp_path, source_path):
    common = dict(source=source_path, dataset="animal-mnist", mode="fixed", cache_dir=str(tmp_path / "cache"),
                  penalties=[1e-4, 1e-2, 1.0], progress=False, eval_attack=Attack.of("l2", 0.25, steps=3),
                  eval_examples=64, precision="fp32")
    first = transfer(out_dir=str(tmp_path / "a"), **common)
    record = json.loads((tmp_path / "a" / "result.json").read_text())
    assert record["test"]["score"] == first.test_score > 0.2  # 10 classes: chance is 0.1
    assert record["selection"]["by"] == "penalty" and len(record["selection"]["val_scores"]) == 3
    assert record["source"]["content_sha256"] and record["source"]["threat"] == {"norm": "l2", "eps": 0.5}
    assert record["config"]["mode"] == "fixed" and record["timings"]["features_s"] > 0
    assert record["robust"]["robust_acc"] <= record["robust"]["clean_acc"]
    second = transfer(out_dir=str(tmp_path / "b"), **common)
    assert second.record.timings["cached_splits"] == 3 and second.record.timings["features_s"] == 0
    assert second.test_score == pytest.approx(first.test_score)
    # The head went into the model: its own predictions give the recorded score (up to an image whose two top
    # logits tie within float rounding: the head ran on cached features there, on the whole network here).
    model = load_model(first.model_path)
    assert model.spec.num_classes == 10
    test = load_dataset("animal-mnist").test
    predictions, labels = predict(model, test, torch.device("cpu"), "fp32")
    assert score(predictions, labels, 10, "top1") == pytest.approx(first.test_score, abs=2 / len(test))
    assert score(predictions, labels, 10, "top1") > 0.2
    source = load_model(source_path).state_dict()
    target = model.state_dict()
    assert not _changed(source, target, "model.layer")  # the backbone is untouched


def test_partial_transfer_freezes_exactly_the_first_stages(tmp_path, source_path):
    result = transfer(source=source_path, dataset="digits", mode="partial:1", epochs=1, lrs=[0.05], refit=False,
                      batch_size=32, out_dir=str(tmp_path), progress=False)
    source, target = load_model(source_path), load_model(result.model_path)
    before, after = source.state_dict(), target.state_dict()
    first_stage = stages(source)[0]
    for name in first_stage:
        assert not _changed(before, after, f"model.{name}."), name  # frozen, BatchNorm statistics included
    assert _changed(before, after, "model.layer2.") and _changed(before, after, "model.layer3.")
    assert result.record.selection.frozen_stages == 1
    assert target.spec.num_classes == 10 and result.record.target.image_size == 28  # digits upsampled


def test_full_network_changes_everything_and_picks_a_learning_rate(tmp_path, source_path):
    result = transfer(source=source_path, dataset="mnist-5k", mode="full", epochs=1, lrs=[0.05, 0.005],
                      train_examples=512, out_dir=str(tmp_path), progress=False)
    before, after = load_model(source_path).state_dict(), load_model(result.model_path).state_dict()
    assert _changed(before, after, "model.conv1.") and _changed(before, after, "model.layer3.")
    assert set(result.record.selection.val_scores) == {"0.05", "0.005"}
    assert result.record.selection.chosen in (0.05, 0.005)


def test_paper_protocol_trains_only_the_head(tmp_path, source_path):
    result = transfer(source=source_path, dataset="digits", mode="fixed", protocol="paper", epochs=3, lrs=[0.1],
                      refit=False, out_dir=str(tmp_path), progress=False)
    trained = load_model(result.model_path)
    before, after = load_model(source_path).state_dict(), trained.state_dict()
    assert not _changed(before, after, "model.layer") and not _changed(before, after, "model.bn1.")
    assert result.record.protocol == "paper"
    torch.manual_seed(0)  # the new head's initialisation, as transfer draws it
    untrained = replace_head(load_model(source_path), 10)
    assert _changed(untrained.state_dict(), after, "model.fc.")  # the head trained...
    test = load_dataset("digits", image_size=28).test
    untrained_score = score(*predict(untrained, test, torch.device("cpu"), "fp32"), 10, "top1")
    assert result.test_score > untrained_score + 0.05  # ...into something better than its initialisation


def test_a_head_with_hidden_layers_saves_and_reloads_to_the_same_predictions(tmp_path, source_path):
    result = transfer(source=source_path, dataset="animal-mnist", mode="full", hidden=[32], train_examples=256,
                      epochs=1, lrs=[0.01], refit=False, precision="fp32", out_dir=str(tmp_path), progress=False)
    loaded = load_model(result.model_path)
    assert loaded.spec.head_hidden == (32,) and isinstance(loaded.model.fc, MLPHead)
    assert [m.out_features for m in loaded.model.fc if isinstance(m, torch.nn.Linear)] == [32, 10]
    x = load_dataset("animal-mnist", image_size=28, in_channels=1).test.images[:64].float() / 255
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), result.model.eval()(x))


def _bordered_gradient(height: int = 200, width: int = 300, border: int = 4) -> np.ndarray:
    """Red/green ramps across x/y over a fine 3 px checker (any extra resampling blurs it visibly), and a white
    frame ``border`` pixels wide: blue only in the frame."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x / (width - 1) * 191, y / (height - 1) * 191, np.zeros((height, width))], -1)
    image[..., :2] += ((x // 3 + y // 3) % 2 * 64)[..., None]
    image[:border], image[-border:], image[:, :border], image[:, -border:] = 255, 255, 255, 255
    return image.round().astype(np.uint8)


@pytest.mark.parametrize("name", ["imagefolder", "dtd"])
def test_held_out_images_get_the_papers_resize_and_centre_crop(tmp_path, monkeypatch, name):
    from robust_transfer.data import folder

    image = _bordered_gradient()
    for split, count in (("train", 3), ("test", 1)):
        for label in ("a", "b"):
            for index in range(count):
                (tmp_path / split / label).mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(tmp_path / split / label / f"{index}.png")
    size = 112
    data = load_dataset(name, tmp_path, image_size=size)
    # The paper at this size: Resize(128) (shorter side; 300 x 200 -> 192 x 128), CenterCrop(112).
    resize = round(size * 256 / 224)
    paper = np.asarray(Image.fromarray(image).resize((resize * 3 // 2, resize), Image.Resampling.BILINEAR))
    top, left = (resize - size) // 2, (resize * 3 // 2 - size) // 2
    paper = torch.from_numpy(paper[top:top + size, left:left + size].copy()).permute(2, 0, 1).float() / 255
    for split in (data.test, data.val):  # val too: held out of train, then decoded again from its files
        assert split.images.shape[1:] == (3, size, size)
        assert split.images[:, 2].max() == 0  # the frame (8 of 128 px cropped from each edge) is gone
        # One resampling from the file, as PIL's: only uint8 rounding may differ (resampling the train decode
        # up by 256/224 instead was off by up to 22/255 on the checker, 5.7/255 on average).
        assert max((split[i][0] - paper).abs().max().item() for i in range(len(split))) <= 1 / 255 + 1e-6
    # Train keeps the whole centre square: the frame shows at the top, where the test crop cut it away.
    assert data.train.images[:, 2, 0].float().mean() > 200
    monkeypatch.setattr(folder, "IN_MEMORY_LIMIT_BYTES", 0)  # decoded item by item: the same pixels
    lazy = load_dataset(name, tmp_path, image_size=size)
    for got, expected in ((lazy.test, data.test), (lazy.val, data.val)):
        assert isinstance(got, folder.FolderDataset) and len(got) == len(expected)
        assert all(torch.equal(got[i][0], expected[i][0]) for i in range(len(got)))


def test_in_memory_sets_get_the_test_crop_only_when_resized():
    native, resized = load_dataset("digits"), load_dataset("digits", image_size=16)
    assert torch.equal(load_dataset("digits", image_size=8).test.images, native.test.images)
    assert torch.equal(resized.train.images, native.train.resized(16).images)
    expected = native.test.resized(18).images[..., 1:17, 1:17]  # 16 * 256 / 224 = 18.3 -> 18, crop 16
    assert torch.equal(resized.test.images, expected)


@pytest.mark.parametrize("args,message", [
    (["--mode", "partial:9"], "partial:0 .. partial:3"),
    (["--mode", "sideways"], "unknown mode"),
    (["--protocol", "paper", "--mode", "full"], "applies to --mode fixed"),
    (["--eval-eps", "-1"], "eps must be"),
])
def test_bad_transfer_input_is_one_line_and_exit_2(tmp_path, capsys, source_path, args, message):
    code = main(["transfer", source_path, "--dataset", "digits", "--out-dir", str(tmp_path), "--no-progress", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_linear_probe_picks_a_penalty_on_validation_and_maps_back_to_raw_features():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 20, generator=generator) * 3
    labels = torch.randint(0, 3, (300,), generator=generator)
    features = centres[labels] + torch.randn(300, 20, generator=generator) + 50  # offset: standardisation matters
    head = fit_linear_head(features[:200], labels[:200], features[200:250], labels[200:250], 3,
                           penalties=[1e-4, 1e-1, 100.0])
    assert set(head.val_scores) == {1e-4, 1e-1, 100.0} and head.penalty in head.val_scores
    accuracy = ((features[250:] @ head.weight.T + head.bias).argmax(1) == labels[250:]).float().mean()
    assert accuracy > 0.95


def test_mean_per_class_accuracy_weights_classes_equally():
    labels = torch.tensor([0, 0, 0, 0, 1])
    predictions = torch.tensor([0, 0, 0, 0, 0])
    assert score(predictions, labels, 2, "top1") == pytest.approx(0.8)
    assert score(predictions, labels, 2, "mean_per_class") == pytest.approx(0.5)


def test_closed_form_loss_and_gradients_match_autograd():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(64, 7, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (64,), generator=generator)
    weight = torch.randn(4, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=generator, dtype=torch.float64, requires_grad=True)
    expected = F.cross_entropy(features @ weight.T + bias, labels) + 0.5 * 0.3 * weight.pow(2).sum()
    expected.backward()
    onehot_t = F.one_hot(labels, 4).double().T.contiguous()
    loss, weight_grad, bias_grad = penalised_cross_entropy(weight.detach(), bias.detach(), features,
                                                           features.T.contiguous(), onehot_t, 0.3)
    assert torch.allclose(loss, expected.detach())
    assert torch.allclose(weight_grad, weight.grad) and torch.allclose(bias_grad, bias.grad)


def test_linear_probe_reaches_the_penalised_optimum():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(400, 12, generator=generator)
    labels = (features[:, :3] + 0.5 * torch.randn(400, 3, generator=generator)).argmax(1)
    head = fit_linear_head(features[:300], labels[:300], features[300:], labels[300:], 3, penalties=[1e-2],
                           refit=False, max_iter=500)
    # The head is returned for raw features; the penalty applies in standardised space, so check optimality
    # there: the gradient of the penalised loss must vanish.
    mean, std = features[:300].mean(0), features[:300].std(0)
    standardised = (features[:300] - mean) / std
    weight = (head.weight * std).requires_grad_(True)
    bias = (head.bias + (head.weight * mean).sum(1)).requires_grad_(True)
    loss = F.cross_entropy(standardised @ weight.T + bias, labels[:300]) + 0.5 * 1e-2 * weight.pow(2).sum()
    loss.backward()
    assert weight.grad.abs().max() < 1e-4 and bias.grad.abs().max() < 1e-4


def test_the_transfer_function_stays_callable_after_its_package_is_imported():
    script = ("import robust_transfer.study\nfrom robust_transfer import transfer\n"
              "from robust_transfer.transfer import transfer as function\n"
              "assert callable(transfer) and callable(function)\n"
              "try:\n    transfer(source='')\nexcept Exception as error:\n    print(type(error).__name__, error)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("RobustTransferError give the source model")
