"""Exact colour-segmentation detector for `shapes` images (GenEval-style scoring on CPU).

Every pixel is read as a blend of the white background and one palette colour
(:func:`color_labels`): it takes the colour whose blend line passes nearest (within
``max_color_distance``) when it is at least half that colour, so blurred or noisy images keep
their objects' outlines. Each palette colour's pixels are split into 8-connected components
(holes filled); components smaller than ``min_area`` are dropped. A component's shape is the
template (circle, square, triangle drawn exactly as the corpus draws them, stretched to the
component's box) with the highest IoU against it, and that IoU is the detection's score: 1.0
for a clean rendered object, lower for blurry or odd blobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from tokenflow.data.shapes import BACKGROUND, PALETTE, SHAPES, shape_mask

_COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)
_WHITE = np.array(BACKGROUND, dtype=np.float32)
# Blend directions from the background to each palette colour, in _COLOR_NAMES order.
_DIRECTIONS = np.array(list(PALETTE.values()), dtype=np.float32) - _WHITE
_DIRECTION_NORM2 = (_DIRECTIONS ** 2).sum(-1)
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Detection:
    """One detected object, in the corpus' conventions (``bbox`` end exclusive, pixel-centre
    centroid)."""

    shape: str
    color: str
    bbox: tuple[int, int, int, int]
    center: tuple[float, float]
    area: int
    score: float


def _to_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` float32 in 0..255 from a PIL image or a uint8 / [0, 1] float array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"expected an [H, W, 3|4] image array, got shape {arr.shape}")
    arr = arr[..., :3]
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(arr, 0.0, 1.0).astype(np.float32) * 255.0
    return arr.astype(np.float32)


def color_labels(image: Image.Image | np.ndarray, max_color_distance: float = 70.0) -> np.ndarray:
    """``[H, W]`` int map: ``1 + i`` for the i-th palette colour, 0 for background or nothing.

    A pixel is modelled as a blend ``white + a * (colour - white)``: it belongs to the colour
    whose blend line passes closest to it, when that distance is within ``max_color_distance``
    and the blend is at least half colour (``a >= 0.5``), so blurred edges are cut at their
    50% contour and keep the object's outline.
    """
    offset = _to_rgb(image) - _WHITE
    alpha = offset @ _DIRECTIONS.T / _DIRECTION_NORM2  # [H, W, C]
    residual2 = ((offset[:, :, None, :] - alpha[..., None] * _DIRECTIONS) ** 2).sum(-1)
    residual2[alpha < 0.5] = np.inf
    best = residual2.argmin(-1)
    labels = best + 1
    labels[np.take_along_axis(residual2, best[..., None], -1)[..., 0] > max_color_distance ** 2] = 0
    return labels


def _classify(mask: np.ndarray) -> tuple[str, float]:
    """Best-matching shape template for a component cropped to its box, and the IoU."""
    height, width = mask.shape
    best_shape, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        template = shape_mask(shape, width, height)
        iou = float((template & mask).sum() / (template | mask).sum())
        if iou > best_iou:
            best_shape, best_iou = shape, iou
    return best_shape, best_iou


def detect_shapes(image: Image.Image | np.ndarray, min_area: int = 24,
                  max_color_distance: float = 70.0) -> list[Detection]:
    """Detect flat-coloured palette objects; sorted top to bottom, then left to right.

    ``min_area`` drops specks (the corpus' smallest object, a 12 px triangle, has 84 pixels);
    ``max_color_distance`` (RGB Euclidean) bounds how far a pixel may be from its blend line.
    """
    labels = color_labels(image, max_color_distance)
    detections = []
    for index, color in enumerate(_COLOR_NAMES, start=1):
        components, _ = ndimage.label(labels == index, structure=_EIGHT_CONNECTED)
        for component, box in enumerate(ndimage.find_objects(components), start=1):
            mask = ndimage.binary_fill_holes(components[box] == component)
            area = int(mask.sum())
            if area < min_area:
                continue
            ys, xs = np.nonzero(mask)
            y0, x0 = box[0].start, box[1].start
            shape, score = _classify(mask)
            detections.append(Detection(
                shape=shape, color=color, bbox=(x0, y0, box[1].stop, box[0].stop),
                center=(float(x0 + xs.mean() + 0.5), float(y0 + ys.mean() + 0.5)),
                area=area, score=score))
    detections.sort(key=lambda d: (d.center[1], d.center[0]))
    return detections
