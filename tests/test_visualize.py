"""Perceptual-alignment pictures: inversion, class synthesis and saliency on the project's PGD."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

from robust_transfer.attack import Attack
from robust_transfer.cli import main
from robust_transfer.errors import RobustTransferError
from robust_transfer.models import create_model, save_model, with_normalization
from robust_transfer.visualize import (
    class_seeds,
    feature_distance,
    invert_representation,
    saliency,
    save_grid,
    synthesize_class,
)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return create_model("small_resnet", 10, 1).eval()


def test_inversion_lowers_the_feature_distance_monotonically_and_stays_in_the_ball(model):
    generator = torch.Generator().manual_seed(1)
    target, start = torch.rand(4, 1, 28, 28, generator=generator), torch.rand(4, 1, 28, 28, generator=generator)
    distances = [feature_distance(model, start, target)]
    # a fixed step size makes each run a prefix of the next: the same trajectory, read further along
    for steps in (5, 10, 20, 40):
        inverted = invert_representation(model, target, start, Attack.of("l2", 20, steps=steps, step_size=0.1))
        assert ((inverted - start).flatten(1).norm(dim=1) <= 20 + 1e-4).all()
        assert 0 <= inverted.min() and inverted.max() <= 1
        distances.append(feature_distance(model, inverted, target))
    for before, after in zip(distances, distances[1:], strict=False):
        assert (after <= before + 1e-6).all(), (before, after)
    assert (distances[-1] < 0.5 * distances[0]).all()


def test_synthesis_moves_seeds_towards_their_class(model):
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(40, 1, 28, 28, generator=generator)
    labels = torch.arange(40) % 4
    classes = torch.tensor([0, 1, 2, 3])
    seeds = class_seeds(images, labels, classes, generator=generator)
    assert seeds.shape == (4, 1, 28, 28) and 0 <= seeds.min() and seeds.max() <= 1
    drawn = synthesize_class(model, seeds, classes, Attack.of("l2", 10, steps=20))
    with torch.no_grad():
        before = model(seeds).log_softmax(1).gather(1, classes.view(-1, 1))
        after = model(drawn).log_softmax(1).gather(1, classes.view(-1, 1))
    assert (after > before).all()
    with pytest.raises(RobustTransferError, match="class 9 has 0 image"):
        class_seeds(images, labels, torch.tensor([9]))


def test_saliency_is_zero_where_the_model_does_not_look():
    linear = nn.Linear(64, 2)
    with torch.no_grad():
        linear.weight.view(2, 8, 8)[:, :, 4:] = 0  # the right half of the image is ignored
    model = with_normalization(nn.Sequential(nn.Flatten(), linear), mean=(0.5,), std=(0.25,))
    maps = saliency(model, torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 0]))
    assert maps.shape == (3, 1, 8, 8) and maps.amax(dim=(1, 2, 3)).allclose(torch.ones(3))
    assert (maps[..., 4:] == 0).all() and (maps[..., :4] > 0).any()


def test_a_grid_is_one_png_with_a_row_per_model(tmp_path):
    path = save_grid({"standard": torch.rand(5, 1, 28, 28), "robust": torch.rand(3, 3, 28, 28)}, tmp_path / "g.png")
    with Image.open(path) as image:
        width, height = image.size
    assert image.format == "PNG" and width > height  # 5 columns, 2 rows


def test_pictures_need_a_pgd_attack_with_a_ball(model):
    x = torch.rand(1, 1, 28, 28)
    with pytest.raises(RobustTransferError, match="needs a PGD attack with eps > 0"):
        invert_representation(model, x, x, Attack.of("l2", 0))
    with pytest.raises(RobustTransferError, match="must have one shape"):
        invert_representation(model, x, torch.rand(2, 1, 28, 28), Attack.of("l2", 5))


def test_the_command_draws_one_row_per_model(model, tmp_path, capsys):
    paths = [str(save_model(model, tmp_path / name / "model")) for name in ("standard", "robust")]
    for kind in ("inversion", "synthesis", "saliency"):
        assert main(["visualize", *paths, "--kind", kind, "--dataset", "fashion-mnist", "--images", "3",
                     "--steps", "3", "--out", str(tmp_path / "pictures")]) == 0
        assert capsys.readouterr().out.strip() == f"{kind}: {tmp_path / 'pictures' / f'{kind}.png'}"
        with Image.open(tmp_path / "pictures" / f"{kind}.png") as image:
            assert image.format == "PNG"
    assert main(["visualize", *paths, "--dataset", "fashion-mnist", "--labels", "one", "--out", str(tmp_path)]) == 2
    assert "1 label(s) for 2 model(s)" in capsys.readouterr().err
