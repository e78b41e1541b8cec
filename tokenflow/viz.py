"""Image grids a person can look at: originals next to reconstructions or samples."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

_LABEL_HEIGHT = 12
_PAD = 2


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] floats in [0, 1] -> [N, H, W, 3] uint8."""
    arr = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(rows: Sequence[torch.Tensor], row_labels: Sequence[str] | None = None,
               scale: int = 1) -> Image.Image:
    """Stack equally sized image batches as rows of a grid; optional label above each row."""
    if not rows:
        raise ValueError("image_grid needs at least one row")
    n, _, h, w = rows[0].shape
    if any(r.shape[0] != n or r.shape[-2:] != (h, w) for r in rows):
        raise ValueError("all rows need the same number of images of the same size")
    cell_h, cell_w = h * scale, w * scale
    label_h = _LABEL_HEIGHT if row_labels else 0
    grid = Image.new("RGB", (n * (cell_w + _PAD) + _PAD, len(rows) * (cell_h + label_h + _PAD) + _PAD),
                     (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, batch in enumerate(rows):
        top = _PAD + r * (cell_h + label_h + _PAD)
        if row_labels:
            draw.text((_PAD, top), row_labels[r], fill=(0, 0, 0))
        for c, arr in enumerate(to_uint8(batch)):
            tile = Image.fromarray(arr).resize((cell_w, cell_h), Image.NEAREST)
            grid.paste(tile, (_PAD + c * (cell_w + _PAD), top + label_h))
    return grid


def save_image_grid(path: str | Path, rows: Sequence[torch.Tensor],
                    row_labels: Sequence[str] | None = None, scale: int = 1) -> Path:
    """Write :func:`image_grid` as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, row_labels, scale).save(path)
    return path
