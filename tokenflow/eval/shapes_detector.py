"""Exact colour-segmentation detector for `shapes` images (GenEval-style scoring on CPU).

Every pixel is read as a blend of the white background and one palette colour
(:func:`color_labels`): it takes the colour whose blend line passes nearest (within
``max_color_distance``) when it is at least half that colour, so blurred or noisy images keep
their objects' outlines. Each palette colour's pixels are split into 8-connected components
(holes filled); components smaller than ``min_area`` are dropped. A component's shape is the
template (circle, square, triangle drawn exactly as the corpus draws them, stretched to the
component's box) with the highest IoU against it, and that IoU is the detection's score: 1.0
for a clean rendered object, lower for blurry or odd blobs.

A component is an object only when it stands on background, as the corpus draws objects (at
least 3 px apart): at least ``min_isolation`` of the pixels within ``ISOLATION_RING`` px around
it must be background (:func:`background_mask`: white, or a pale tint of one palette colour such
as a blurred edge's halo). A blob pressed against other colours is clutter, not a drawn object:
without this rule, decoded noise is full of blobs that pass as circles and squares.
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
ISOLATION_RING = 2  # px; the corpus keeps 3 px of background between objects


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
    isolation: float


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


def _blend(image: Image.Image | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's offset from white ``[H, W, 3]`` and, per palette colour, the blend ``a`` of
    ``white + a * (colour - white)`` nearest to it ``[H, W, C]``."""
    offset = _to_rgb(image) - _WHITE
    return offset, offset @ _DIRECTIONS.T / _DIRECTION_NORM2


def _distance2(offset: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Squared RGB distance ``[H, W, C]`` from each pixel to each colour's blend ``alpha``."""
    return ((offset[:, :, None, :] - alpha[..., None] * _DIRECTIONS) ** 2).sum(-1)


def color_labels(image: Image.Image | np.ndarray, max_color_distance: float = 70.0) -> np.ndarray:
    """``[H, W]`` int map: ``1 + i`` for the i-th palette colour, 0 for background or nothing.

    A pixel is modelled as a blend ``white + a * (colour - white)``: it belongs to the colour
    whose blend line passes closest to it, when that distance is within ``max_color_distance``
    and the blend is at least half colour (``a >= 0.5``), so blurred edges are cut at their
    50% contour and keep the object's outline.
    """
    return _labels(*_blend(image), max_color_distance)


def _labels(offset: np.ndarray, alpha: np.ndarray, max_color_distance: float) -> np.ndarray:
    """:func:`color_labels` from the pixels' :func:`_blend`."""
    residual2 = _distance2(offset, alpha)
    residual2[alpha < 0.5] = np.inf
    best = residual2.argmin(-1)
    labels = best + 1
    labels[np.take_along_axis(residual2, best[..., None], -1)[..., 0] > max_color_distance ** 2] = 0
    return labels


def background_mask(image: Image.Image | np.ndarray, max_color_distance: float = 70.0) -> np.ndarray:
    """``[H, W]`` bool: white, or within ``max_color_distance`` of a blend that is less than half
    some palette colour (the halo of a blurred edge); dark or mixed pixels are not background."""
    return _background(*_blend(image), max_color_distance)


def _background(offset: np.ndarray, alpha: np.ndarray, max_color_distance: float) -> np.ndarray:
    """:func:`background_mask` from the pixels' :func:`_blend`."""
    return _distance2(offset, np.clip(alpha, 0.0, 0.5)).min(-1) <= max_color_distance ** 2


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


def _isolation(mask: np.ndarray, box: tuple[slice, slice], background: np.ndarray) -> float:
    """Fraction of background pixels within ISOLATION_RING px of a component (``mask`` cropped to
    ``box``), the ring clipped to the image."""
    height, width = background.shape
    y0, x0 = max(0, box[0].start - ISOLATION_RING), max(0, box[1].start - ISOLATION_RING)
    y1, x1 = min(height, box[0].stop + ISOLATION_RING), min(width, box[1].stop + ISOLATION_RING)
    grown = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    grown[box[0].start - y0 : box[0].stop - y0, box[1].start - x0 : box[1].stop - x0] = mask
    ring = ndimage.binary_dilation(grown, _EIGHT_CONNECTED, iterations=ISOLATION_RING) & ~grown
    return float(background[y0:y1, x0:x1][ring].mean()) if ring.any() else 1.0


def detect_shapes(image: Image.Image | np.ndarray, min_area: int = 24, max_color_distance: float = 70.0,
                  min_isolation: float = 0.8) -> list[Detection]:
    """Detect flat-coloured palette objects standing on background; sorted top to bottom, then
    left to right.

    ``min_area`` drops specks (the corpus' smallest object, a 12 px triangle, has 84 pixels);
    ``max_color_distance`` (RGB Euclidean) bounds how far a pixel may be from its blend line;
    ``min_isolation`` is the background fraction required around a component (module docstring).
    """
    offset, alpha = _blend(image)
    labels = _labels(offset, alpha, max_color_distance)
    background = _background(offset, alpha, max_color_distance)
    detections = []
    for index, color in enumerate(_COLOR_NAMES, start=1):
        components, _ = ndimage.label(labels == index, structure=_EIGHT_CONNECTED)
        for component, box in enumerate(ndimage.find_objects(components), start=1):
            mask = ndimage.binary_fill_holes(components[box] == component)
            area = int(mask.sum())
            if area < min_area:
                continue
            isolation = _isolation(mask, box, background)
            if isolation < min_isolation:
                continue
            ys, xs = np.nonzero(mask)
            y0, x0 = box[0].start, box[1].start
            shape, score = _classify(mask)
            detections.append(Detection(
                shape=shape, color=color, bbox=(x0, y0, box[1].stop, box[0].stop),
                center=(float(x0 + xs.mean() + 0.5), float(y0 + ys.mean() + 0.5)),
                area=area, score=score, isolation=isolation))
    detections.sort(key=lambda d: (d.center[1], d.center[0]))
    return detections
