"""Batch augmentations, drawn once per global batch and applied to any share of its rows.

Drawing is separate from applying so that a data-parallel rank can decode only its own rows
and still give every example exactly the augmentation a single process would give it: the
parameters are drawn for the whole global batch from the batch's generator, then the rank
keeps its rows of them. All of it is vectorised over the batch (no per-image Python loop).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "crop", "crop-flip", "resized-crop-flip")

# The paper's test transform, Resize(256) + CenterCrop(224), at any image size: the shorter side goes to
# size * 256 / 224, then the central size x size is kept. Named here so caches can key on it (renamed when its
# pixels change: image files' held-out splits are now resampled once, from the file).
EVAL_RESIZE_RATIO = 256 / 224
EVAL_TRANSFORM = "resize 256/224 + centre crop, from the file"


@dataclass(frozen=True)
class AugmentParams:
    """Random choices for the rows of one batch: crop shifts and flips, or resized-crop boxes."""

    kind: str
    pad: int = 0
    shifts: torch.Tensor | None = None  # [n, 2] offsets into the zero-padded image, 0..2*pad
    flips: torch.Tensor | None = None   # [n] bool
    theta: torch.Tensor | None = None   # [n, 2, 3] affine boxes for resized-crop-flip

    def rows(self, index: slice | torch.Tensor) -> AugmentParams:
        """The parameters of a subset of rows (e.g. one rank's ``slice(rank, None, world_size)``)."""
        pick = lambda t: None if t is None else t[index]
        return AugmentParams(self.kind, self.pad, pick(self.shifts), pick(self.flips), pick(self.theta))


def crop_padding(height: int, width: int) -> int:
    """Zero padding of the random crop: side // 8 (4 at 32 px, 3 at 28 px), at least 1."""
    return max(1, min(height, width) // 8)


def draw_augmentation(augment: str, n: int, height: int, width: int, generator: torch.Generator,
                      scale: tuple[float, float] = (0.08, 1.0),
                      ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> AugmentParams:
    """Draw the random choices of ``augment`` for a batch of ``n`` images of ``height`` x ``width``."""
    if augment == "none":
        return AugmentParams("none")
    if augment == "resized-crop-flip":
        area = torch.empty(n).uniform_(*scale, generator=generator)
        low, high = torch.tensor(ratio[0]).log().item(), torch.tensor(ratio[1]).log().item()
        log_ratio = torch.empty(n).uniform_(low, high, generator=generator)
        aspect = log_ratio.exp()
        box_width = (area * aspect).sqrt().clamp(max=1.0)  # as fractions of the image side
        box_height = (area / aspect).sqrt().clamp(max=1.0)
        centre_x = (torch.rand(n, generator=generator) * 2 - 1) * (1 - box_width)
        centre_y = (torch.rand(n, generator=generator) * 2 - 1) * (1 - box_height)
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = box_width * flip, centre_x
        theta[:, 1, 1], theta[:, 1, 2] = box_height, centre_y
        return AugmentParams("resized-crop-flip", theta=theta)
    if augment in ("crop", "crop-flip"):
        pad = crop_padding(height, width)
        shifts = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
        if augment == "crop-flip":
            flips = torch.rand(n, generator=generator) < 0.5
        else:
            flips = torch.zeros(n, dtype=torch.bool)
        return AugmentParams("crop", pad=pad, shifts=shifts, flips=flips)
    raise ValueError(f"unknown augmentation {augment!r}; use one of {', '.join(AUGMENTATIONS)}")


def apply_augmentation(x: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Apply ``params`` (one row per image of ``x``) to a float NCHW batch in [0, 1]."""
    if params.kind == "none" or len(x) == 0:
        return x
    if params.kind == "resized-crop-flip":
        grid = F.affine_grid(params.theta.to(x.dtype), list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.clamp_(0, 1)
    n, channels, height, width = x.shape
    pad = params.pad
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (params.shifts[:, 0:1] + torch.arange(height)).view(n, 1, height, 1)
    rows = rows.expand(n, channels, height, padded.shape[3])
    cols = params.shifts[:, 1:2] + torch.arange(width)
    cols = torch.where(params.flips.view(n, 1), cols.flip(1), cols).view(n, 1, 1, width)
    return padded.gather(2, rows).gather(3, cols.expand(n, channels, height, width))


def augment_batch(x: torch.Tensor, augment: str, generator: torch.Generator) -> torch.Tensor:
    """Draw and apply ``augment`` to a whole batch.

    "crop": random crop with zero padding of side // 8; "crop-flip": that plus a horizontal flip
    with p = 0.5; "resized-crop-flip": RandomResizedCrop (scale 0.08-1, aspect 3/4-4/3) plus flip,
    resampled back to the batch's size; "none": unchanged.
    """
    if len(x) == 0:
        return x
    return apply_augmentation(x, draw_augmentation(augment, len(x), x.shape[-2], x.shape[-1], generator))


def random_resized_crop_flip(x: torch.Tensor, generator: torch.Generator,
                             scale: tuple[float, float] = (0.08, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip (the paper's training transform) on a whole batch at once."""
    params = draw_augmentation("resized-crop-flip", len(x), x.shape[-2], x.shape[-1], generator, scale, ratio)
    return apply_augmentation(x, params)


def eval_resize_size(size: int) -> int:
    """The side the test transform resizes to before its centre crop: 256 for 224, 37 for 32, 32 for 28."""
    return round(size * EVAL_RESIZE_RATIO)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size`` x ``size`` window of ``x`` [..., H, W], offsets rounded as torchvision's CenterCrop."""
    height, width = x.shape[-2:]
    if size > min(height, width):
        raise ValueError(f"cannot centre-crop {size} x {size} from {height} x {width}")
    top, left = int(round((height - size) / 2)), int(round((width - size) / 2))
    return x[..., top:top + size, left:left + size]
