"""Robust decoding of odd/broken image bytes, and the deterministic and augmenting preprocessing."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from tokenflow.config import SampleLimitsConfig
from tokenflow.data import decode
from tokenflow.data.decode import DecodeError, decode_image, preprocess, random_resized_crop, sha256_hex

from tests.fixtures.odd_images import (
    EXIF_FILL,
    EXIF_MARK,
    FIRST_FRAME,
    header_only_png,
    odd_image_samples,
    rgb_ramp,
)

SIZE = 48
SAMPLES = odd_image_samples(SIZE)
GOOD = sorted(name for name, (_, reason) in SAMPLES.items() if reason is None)
BROKEN = sorted(name for name, (_, reason) in SAMPLES.items() if reason is not None)
GRAY = ("grayscale_png", "grayscale_jpeg", "bilevel_png", "la_png", "png16_gray", "int32_tiff", "float_tiff")


def _decode(name: str) -> np.ndarray:
    image = decode_image(SAMPLES[name][0])
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int32)


@pytest.mark.parametrize("name", GOOD)
def test_decodes_to_rgb_with_the_right_size(name):
    image = decode_image(SAMPLES[name][0])
    assert image.mode == "RGB"
    assert image.size == ((SIZE, SIZE * 3 // 2) if name == "exif_rotated_jpeg" else (SIZE, SIZE))


@pytest.mark.parametrize(("name", "tolerance"),
                         [("rgb_png", 0), ("webp", 0), ("rgb_jpeg", 12), ("palette_png", 32)])
def test_colour_content_is_preserved(name, tolerance):
    assert np.abs(_decode(name) - np.asarray(rgb_ramp(SIZE))).max() <= tolerance


@pytest.mark.parametrize("name", GRAY)
def test_grayscale_stays_gray(name):
    arr = _decode(name)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    assert arr.max() - arr.min() > 200  # real content, not a constant fill


@pytest.mark.parametrize("name", ["png16_gray", "int32_tiff", "float_tiff"])
def test_high_bit_depth_is_scaled_not_clipped(name):
    row = _decode(name)[SIZE // 2, :, 0]
    assert (np.diff(row) >= 0).all()
    assert row[0] <= 1 and row[-1] >= 254
    assert len(np.unique(row)) >= SIZE - 2
    expected = np.rint(np.linspace(0, 255, SIZE))
    assert np.abs(row - expected).max() <= 1


def test_alpha_is_composited_onto_white():
    arr = _decode("rgba_png")
    rgb = np.asarray(rgb_ramp(SIZE)).astype(np.int32)
    half = SIZE // 2
    assert (arr[:half, :half] == 255).all()  # fully transparent -> white
    np.testing.assert_array_equal(arr[:half, half:], rgb[:half, half:])  # opaque unchanged
    blended = rgb[half:, half:] * 128 / 255 + 255 * 127 / 255
    assert np.abs(arr[half:, half:] - blended).max() <= 1
    la = _decode("la_png")
    assert (la[:half, :half] == 255).all()


def test_palette_transparency_becomes_white():
    arr = _decode("palette_transparent_png")
    half = SIZE // 2
    assert (arr[:half, :half] == 255).all()
    rest = np.ones((SIZE, SIZE), bool)
    rest[:half, :half] = False
    assert np.abs(arr[rest] - np.asarray(rgb_ramp(SIZE))[rest]).max() <= 32


def test_cmyk_jpeg_colours():
    arr = _decode("cmyk_jpeg")
    half = SIZE // 2
    assert np.abs(arr[: half - 4] - np.array([0, 255, 255])).max() <= 8  # cyan
    assert np.abs(arr[half + 4 :] - np.array([255, 0, 0])).max() <= 8  # red


def test_exif_orientation_is_applied():
    arr = _decode("exif_rotated_jpeg")
    assert arr.shape == (SIZE * 3 // 2, SIZE, 3)  # stored landscape 72x48, displayed portrait
    # Orientation 6: stored top-left quadrant ends up top-right.
    assert np.abs(arr[2, -3] - np.array(EXIF_MARK)).max() <= 8
    for y, x in ((2, 2), (-3, -3), (-3, 2)):
        assert np.abs(arr[y, x] - np.array(EXIF_FILL)).max() <= 8


@pytest.mark.parametrize("name", ["gif", "tiff"])
def test_multi_frame_yields_first_frame(name):
    assert (_decode(name) == np.array(FIRST_FRAME)).all()


@pytest.mark.parametrize("name", BROKEN)
def test_broken_bytes_raise_decode_error_with_reason(name):
    data, reason = SAMPLES[name]
    with pytest.raises(DecodeError) as info:
        decode_image(data)
    assert info.value.reason == reason
    assert str(info.value)


@pytest.mark.parametrize("name", ["truncated_jpeg", "truncated_png"])
def test_truncation_detected_even_when_pillow_is_told_to_load_truncated(name, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(DecodeError) as info:
        decode_image(SAMPLES[name][0])
    assert info.value.reason == "truncated"


def test_good_images_still_decode_when_pillow_loads_truncated(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    for name in GOOD:
        assert decode_image(SAMPLES[name][0]).mode == "RGB"


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")
def test_only_decode_errors_for_damaged_files():
    """Cuts and byte corruptions of every good file: success or DecodeError, nothing else."""
    rng = np.random.default_rng(0)
    for name in GOOD:
        data = SAMPLES[name][0]
        variants = [data[: int(len(data) * f)] for f in np.linspace(0.05, 0.95, 10)]
        for _ in range(10):
            damaged = bytearray(data)
            where = rng.integers(0, len(data), 4)
            damaged[where[0] : where[0] + 1] = b""
            for i in where[1:]:
                damaged[min(int(i), len(damaged) - 1)] = int(rng.integers(0, 256))
            variants.append(bytes(damaged))
        for variant in variants:
            try:
                assert decode_image(variant).mode == "RGB"
            except DecodeError as exc:
                assert exc.reason in {"empty", "truncated", "undecodable", "too_large", "file_too_large",
                                      "extreme_aspect", "bad_dimensions"}


def test_image_limits_are_checked_before_decoding():
    data = SAMPLES["rgb_png"][0]
    assert decode_image(data, SampleLimitsConfig(max_image_pixels=SIZE * SIZE)).size == (SIZE, SIZE)
    with pytest.raises(DecodeError) as info:
        decode_image(data, SampleLimitsConfig(max_image_pixels=SIZE * SIZE - 1))
    assert info.value.reason == "too_large"
    # The header declares 4000x4000 but holds almost no pixel data: rejected before any decode,
    # so the reason is the budget, not truncation.
    with pytest.raises(DecodeError) as info:
        decode_image(header_only_png(4000, 4000), SampleLimitsConfig(max_image_pixels=1_000_000))
    assert info.value.reason == "too_large"
    with pytest.raises(DecodeError) as info:  # a 1 x 20,000 strip: few pixels, but no image to learn from
        decode_image(header_only_png(20_000, 1))
    assert info.value.reason == "extreme_aspect"
    with pytest.raises(DecodeError) as info:
        decode_image(data, SampleLimitsConfig(max_image_bytes=len(data) - 1))
    assert info.value.reason == "file_too_large"


def test_eps_is_never_opened():
    data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n"
    assert Image.open(io.BytesIO(data)).format == "EPS"  # Pillow alone would hand it to Ghostscript
    with pytest.raises(DecodeError) as info:
        decode_image(data)
    assert info.value.reason == "undecodable"


def test_sha256_hex():
    assert sha256_hex(b"") == hashlib.sha256(b"").hexdigest()
    assert sha256_hex(b"hello") == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"


def _bands(width: int, height: int) -> Image.Image:
    """Three vertical bands (red, green, blue) of equal width."""
    arr = np.zeros((height, width, 3), np.uint8)
    third = width // 3
    arr[:, :third, 0] = 255
    arr[:, third : 2 * third, 1] = 255
    arr[:, 2 * third :, 2] = 255
    return Image.fromarray(arr)


@pytest.mark.parametrize("shape", [(144, 48), (288, 96), (48, 144), (20, 30), (64, 64)])
def test_preprocess_shape_range_determinism(shape):
    image = _bands(*shape)
    out = preprocess(image, 32)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert torch.equal(out, preprocess(image, 32))


@pytest.mark.parametrize("scale", [1, 2])
def test_preprocess_centre_crops_the_long_side(scale):
    out = preprocess(_bands(144 * scale, 48 * scale), 48)
    interior = out[:, :, 4:-4]  # away from the bicubic blend at the band edges
    green = torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand_as(interior)
    assert torch.allclose(interior, green, atol=0.02)


def test_preprocess_rejects_non_rgb():
    with pytest.raises(ValueError):
        preprocess(Image.new("L", (8, 8)), 8)


def test_random_resized_crop_is_seed_deterministic_and_varies():
    image = _bands(90, 60)
    outs = [random_resized_crop(image, 32, np.random.default_rng(seed)) for seed in range(12)]
    for seed, out in enumerate(outs):
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert torch.equal(out, random_resized_crop(image, 32, np.random.default_rng(seed)))
    assert len({out.numpy().tobytes() for out in outs}) >= 8
    # Flips happen: red (left band) sometimes ends up on the right.
    assert any(out[0, :, -1].mean() > out[0, :, 0].mean() for out in outs)
    assert any(out[0, :, 0].mean() > out[0, :, -1].mean() for out in outs)


def test_random_resized_crop_without_scale_jitter_is_a_possibly_flipped_preprocess():
    image = rgb_ramp(32)
    expected = preprocess(image, 32)
    for seed in range(6):
        out = random_resized_crop(image, 32, np.random.default_rng(seed), min_scale=1.0)
        assert torch.equal(out, expected) or torch.equal(out, expected.flip(-1))


def test_random_resized_crop_short_side_range(monkeypatch):
    """The short side before cropping is an integer in [size, ceil(size / min_scale)], all reached."""
    seen = []
    real = decode._resize_short_side

    def spy(image, short):
        seen.append(short)
        return real(image, short)

    monkeypatch.setattr(decode, "_resize_short_side", spy)
    image = rgb_ramp(64)
    for seed in range(100):
        random_resized_crop(image, 40, np.random.default_rng(seed), min_scale=0.8)
    assert set(seen) == set(range(40, 51))


@pytest.mark.parametrize("min_scale", [0.0, 1.5])
def test_random_resized_crop_rejects_bad_min_scale(min_scale):
    with pytest.raises(ValueError):
        random_resized_crop(rgb_ramp(16), 16, np.random.default_rng(0), min_scale=min_scale)
