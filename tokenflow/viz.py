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
               scale: int = 1, title: str | None = None) -> Image.Image:
    """Stack equally sized image batches as rows of a grid; an optional label above each row and
    a title (a legend) on top, both whole (multi-line with ``\\n``; the grid widens to fit them)."""
    if not rows:
        raise ValueError("image_grid needs at least one row")
    n, _, h, w = rows[0].shape
    if any(r.shape[0] != n or r.shape[-2:] != (h, w) for r in rows):
        raise ValueError("all rows need the same number of images of the same size")
    cell_h, cell_w = h * scale, w * scale
    labels = [label.split("\n") for label in row_labels] if row_labels else []
    title_lines = title.split("\n") if title else []
    label_h = _LABEL_HEIGHT * max((len(lines) for lines in labels), default=0)
    title_h = _LABEL_HEIGHT * len(title_lines)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((measure.textlength(line) for lines in [*labels, title_lines] for line in lines), default=0)
    width = max(n * (cell_w + _PAD) + _PAD, int(text_w) + 2 * _PAD)
    grid = Image.new("RGB", (width, title_h + len(rows) * (cell_h + label_h + _PAD) + _PAD), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, line in enumerate(title_lines):
        draw.text((_PAD, _PAD + i * _LABEL_HEIGHT), line, fill=(0, 0, 128))
    for r, batch in enumerate(rows):
        top = title_h + _PAD + r * (cell_h + label_h + _PAD)
        for i, line in enumerate(labels[r] if labels else []):
            draw.text((_PAD, top + i * _LABEL_HEIGHT), line, fill=(0, 0, 0))
        for c, arr in enumerate(to_uint8(batch)):
            tile = Image.fromarray(arr).resize((cell_w, cell_h), Image.NEAREST)
            grid.paste(tile, (_PAD + c * (cell_w + _PAD), top + label_h))
    return grid


def save_image_grid(path: str | Path, rows: Sequence[torch.Tensor],
                    row_labels: Sequence[str] | None = None, scale: int = 1, title: str | None = None) -> Path:
    """Write :func:`image_grid` as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, row_labels, scale, title).save(path)
    return path
