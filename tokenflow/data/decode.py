"""Robust image decoding and the deterministic / augmenting preprocessing of the tokenizer.

:func:`decode_image` turns untrusted bytes into an RGB :class:`PIL.Image.Image` or raises
:class:`DecodeError` (never anything else) with a machine-friendly ``reason`` that the
pre-tokenizer writes to quarantine.
"""

from __future__ import annotations

import hashlib
import io
import math

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from tokenflow.config import DEFAULT_LIMITS, SampleLimitsConfig

# Formats never opened: Pillow's EPS reader runs Ghostscript on the file.
_BLOCKED_FORMATS = frozenset({"EPS"})
_WHITE = (255, 255, 255)


class DecodeError(ValueError):
    """Bytes that cannot become an image; ``reason`` is one of ``empty``, ``truncated``,
    ``undecodable``, ``too_large``, ``file_too_large``, ``extreme_aspect``, ``bad_dimensions``;
    ``str(exc)`` is the human message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _StrictBytesIO(io.BytesIO):
    """A byte stream that, once armed, raises when a read hits the end of the data.

    Pillow reports truncated pixel data only while the process-wide
    ``ImageFile.LOAD_TRUNCATED_IMAGES`` is false. When other code has set it, the stream is armed
    for pixel loading so truncation is still caught: the decoders driven from Python (JPEG, PNG,
    GIF, raw, ...) never read past the end of a complete file. The JPEG 2000 decoder does, so
    with the flag set JPEG 2000 files are rejected as ``undecodable``.
    """

    armed = False

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if self.armed and not data and size != 0:
            raise OSError("image file is truncated")
        return data


def _failure(exc: Exception, context: str) -> DecodeError:
    """Map any exception Pillow raised while opening or loading to a :class:`DecodeError`."""
    if isinstance(exc, Image.DecompressionBombError):
        return DecodeError("too_large", str(exc))
    if isinstance(exc, UnidentifiedImageError):
        return DecodeError("undecodable", "not a recognised image format")
    message = f"{context}: {type(exc).__name__}: {exc}"
    if isinstance(exc, EOFError) or "truncated" in str(exc).lower():
        return DecodeError("truncated", message)
    return DecodeError("undecodable", message)


def _open_formats() -> list[str]:
    Image.init()
    return [f for f in Image.OPEN if f not in _BLOCKED_FORMATS]


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float grayscale to 8-bit ``L`` (Pillow's ``convert`` clips).

    ``I;16*`` and ``I`` (which Pillow also uses for 16-bit data) map 0..65535 onto 0..255;
    ``F`` maps 0..1 onto 0..255 when the data lies in [0, 1] and is clipped to 0..255 otherwise.
    """
    arr = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if np.nanmin(arr) >= 0.0 and np.nanmax(arr) <= 1.0 else 1.0
        arr = np.nan_to_num(arr) * scale
    else:
        arr = arr * (255.0 / 65535.0)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited onto white."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _high_bit_depth_to_l(image)
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, limits: SampleLimitsConfig = DEFAULT_LIMITS) -> Image.Image:
    """Decode image bytes to an RGB image, honouring EXIF orientation; first frame if animated.

    The size in bytes, and the pixel count and aspect ratio from the header, are checked against
    ``limits`` before any pixel is decoded. Pillow's own decompression-bomb limit
    (``Image.MAX_IMAGE_PIXELS``, doubled) still applies on top and is reported as ``too_large``
    too. Raises :class:`DecodeError` for every kind of bad input.
    """
    if not data:
        raise DecodeError("empty", "no image bytes")
    if len(data) > limits.max_image_bytes:
        raise DecodeError("file_too_large", f"{len(data)} bytes exceed max_image_bytes={limits.max_image_bytes}")
    stream = _StrictBytesIO(data)
    try:
        image = Image.open(stream, formats=_open_formats())
    except Exception as exc:  # Pillow raises many types for bad headers
        raise _failure(exc, "header") from exc
    width, height = image.size
    if width <= 0 or height <= 0:
        raise DecodeError("bad_dimensions", f"{image.format} image has size {width}x{height}")
    if width * height > limits.max_image_pixels:
        raise DecodeError("too_large", f"{width}x{height} exceeds max_image_pixels={limits.max_image_pixels}")
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise DecodeError("extreme_aspect", f"{width}x{height} exceeds max_aspect_ratio={limits.max_aspect_ratio:g}")
    stream.armed = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        image.load()
    except Exception as exc:
        raise _failure(exc, f"{image.format} pixels") from exc
    finally:
        stream.armed = False
    try:
        return to_rgb(ImageOps.exif_transpose(image))
    except Exception as exc:
        raise _failure(exc, f"{image.format} {image.mode} to RGB") from exc


def _resize_short_side(image: Image.Image, short: int) -> Image.Image:
    width, height = image.size
    scale = short / min(width, height)
    if width <= height:
        new_size = (short, max(short, round(height * scale)))
    else:
        new_size = (max(short, round(width * scale)), short)
    return image.resize(new_size, Image.Resampling.BICUBIC, reducing_gap=None)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """Bicubic (antialiased) short-side resize to ``size`` and centre crop.

    Returns float32 ``[3, size, size]`` in [0, 1]; deterministic.
    """
    resized = _resize_short_side(image, size)
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    return _to_tensor(resized.crop((left, top, left + size, top + size)))


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator,
                        min_scale: float = 0.8) -> torch.Tensor:
    """Training augmentation of the TokenFlow/LlamaGen reference (``random_crop_arr`` + flip).

    The short side is resized to an integer drawn uniformly from ``[size, ceil(size / min_scale)]``,
    a random ``size x size`` crop is taken and flipped horizontally with probability 0.5.
    Output as :func:`preprocess`; all randomness comes from ``rng``.
    """
    if not 0.0 < min_scale <= 1.0:
        raise ValueError(f"min_scale must be in (0, 1], got {min_scale}")
    short = int(rng.integers(size, math.ceil(size / min_scale), endpoint=True))
    resized = _resize_short_side(image, short)
    top = int(rng.integers(0, resized.height - size, endpoint=True))
    left = int(rng.integers(0, resized.width - size, endpoint=True))
    out = _to_tensor(resized.crop((left, top, left + size, top + size)))
    return out.flip(-1) if rng.random() < 0.5 else out


def sha256_hex(data: bytes) -> str:
    """Hex sha256 digest of ``data``."""
    return hashlib.sha256(data).hexdigest()
