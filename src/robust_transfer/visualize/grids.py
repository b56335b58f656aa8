"""Picture grids: rows of images (one row per model or kind) as one PNG, labelled on the left."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..atomic import atomic_write


def image_grid(rows: dict[str, torch.Tensor], scale: float = 1.2) -> Figure:
    """A figure with one row per entry of ``rows`` (label -> N x C x H x W images in [0, 1])."""
    columns = max(len(images) for images in rows.values())
    figure = Figure(figsize=(scale * columns + 1.5, scale * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for row, (label, images) in enumerate(rows.items()):
        for column in range(columns):
            axis = axes[row][column]
            axis.set_xticks([])
            axis.set_yticks([])
            if column < len(images):
                image = images[column].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
                axis.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            else:
                axis.set_visible(False)
        axes[row][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize="small")
    return figure


def save_grid(rows: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write `image_grid` of ``rows`` to ``path`` as a PNG (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = image_grid(rows)
    atomic_write(path, lambda handle: figure.savefig(handle, format="png", dpi=100, metadata={"Software": None}))
    return path
