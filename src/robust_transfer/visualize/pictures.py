"""Figure 3's grids for several models side by side: what `robust-transfer visualize` draws."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..attack import Attack
from ..data import load_dataset, sample_examples
from ..errors import RobustTransferError
from ..models import load_model
from ..threat import ThreatModel
from .grids import save_grid
from .perception import class_seeds, invert_representation, saliency, synthesize_class

KINDS = ("inversion", "synthesis", "saliency")
DEFAULT_ATTACK = Attack.of("l2", 40.0, steps=200, step_size=0.5)
"""Inversion's and synthesis's search: a large L2 ball (pixel units), as the robustness library's recipes."""


def picture_attack(eps: float | str | None = None, steps: int | None = None,
                   step_size: float | str | None = None) -> Attack:
    """`DEFAULT_ATTACK` with the given fields changed (None keeps the default); a search that cannot move is an
    error."""
    changes = {"steps": steps, "step_size": step_size, "threat": ThreatModel("l2", eps) if eps is not None else None}
    attack = DEFAULT_ATTACK.replace(**{k: v for k, v in changes.items() if v is not None})
    if attack.steps < 1 or attack.threat.eps <= 0:
        raise RobustTransferError(f"the picture search needs steps >= 1 and eps > 0, got {attack.steps} steps and "
                                  f"eps {attack.threat.eps:g}")
    return attack


def sample_test_images(dataset: str, data_root: str | None, count: int, seed: int,
                channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random ``count`` of ``dataset``'s test images ([0, 1], ``channels`` channels) and their labels."""
    split = sample_examples(load_dataset(dataset, data_root, in_channels=channels).test, count, seed=seed)
    pairs = [split[i] for i in range(len(split))]
    images = torch.stack([image for image, _ in pairs]).float()
    return (images / 255 if images.max() > 1 else images), torch.tensor([int(label) for _, label in pairs])


@dataclass(frozen=True)
class PictureInputs:
    """What every model of one grid starts from: the images and labels, the noise inversion starts at, the
    class-conditional seeds synthesis starts at (None for other kinds), and the grid's reference row."""

    kind: str
    images: torch.Tensor
    labels: torch.Tensor
    start: torch.Tensor
    seeds: torch.Tensor | None

    @property
    def reference(self) -> tuple[str, torch.Tensor]:
        """The top row: the test images (inversion, saliency) or the seeds synthesis starts from."""
        return ("seeds", self.seeds) if self.kind == "synthesis" else ("images", self.images)


def picture_inputs(kind: str, dataset: str, data_root: str | None, images: int, seed: int,
                   channels: int) -> PictureInputs:
    """The seeded inputs of one grid: the same for every model that takes ``channels``-channel images."""
    if kind not in KINDS:
        raise RobustTransferError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    if images < 1:
        raise RobustTransferError(f"--images must be >= 1, got {images}")
    x, y = sample_test_images(dataset, data_root, images, seed, channels)
    generator = torch.Generator().manual_seed(seed)
    start = torch.rand(x.shape, generator=generator)
    seeds = None
    if kind == "synthesis":
        pool_x, pool_y = sample_test_images(dataset, data_root, 1000, seed + 1, channels)
        seeds = class_seeds(pool_x, pool_y, y, generator=generator)
    return PictureInputs(kind, x, y, start, seeds)


def picture_row(model: nn.Module, inputs: PictureInputs, attack: Attack | None = None) -> torch.Tensor:
    """One model's row of a grid: its inversions of the images from noise, its drawings of their classes from
    the seeds, or its input-gradient maps of their true classes."""
    attack = attack or DEFAULT_ATTACK
    if inputs.kind == "inversion":
        return invert_representation(model, inputs.images, inputs.start, attack)
    if inputs.kind == "synthesis":
        return synthesize_class(model, inputs.seeds, inputs.labels, attack)
    return saliency(model, inputs.images, inputs.labels)


def draw_pictures(models: list[str], kind: str, dataset: str, out: str | Path, *, labels: list[str] | None = None,
                  data_root: str | None = None, images: int = 8, attack: Attack | None = None,
                  seed: int = 0) -> Path:
    """One grid (``out``/``kind``.png): the dataset's test images on top, then one row per model.

    inversion: each model's inversion of the images from uniform noise; synthesis: each model's drawing of
    the images' classes from class-conditional seeds (fitted to up to 1,000 test images); saliency: each
    model's input-gradient map of the true class. ``attack`` defaults to `DEFAULT_ATTACK`.
    """
    if kind not in KINDS:
        raise RobustTransferError(f"unknown kind {kind!r}: use one of {', '.join(KINDS)}")
    labels = labels or [Path(m).parent.name or Path(m).stem for m in models]
    if len(labels) != len(models):
        raise RobustTransferError(f"{len(labels)} label(s) for {len(models)} model(s): give one label per model")
    loaded = [load_model(name).eval() for name in models]
    channels = loaded[0].spec.in_channels  # the images are shown as the first model takes them
    inputs = picture_inputs(kind, dataset, data_root, images, seed, channels)
    rows = dict([inputs.reference])
    for label, name, model in zip(labels, models, loaded, strict=True):
        if model.spec.in_channels != channels:
            raise RobustTransferError(f"{name} takes {model.spec.in_channels}-channel images and {models[0]} "
                                      f"{channels}: one grid needs models of one input shape")
        rows[label] = picture_row(model, inputs, attack)
    return save_grid(rows, Path(out) / f"{kind}.png")
