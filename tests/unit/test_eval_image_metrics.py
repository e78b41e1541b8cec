"""SSIM against scikit-image's implementation with the same settings; PSNR on known errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from tests.conftest import random_crops
from tokenflow.eval.image_metrics import psnr, ssim


def _skimage_ssim(prediction: torch.Tensor, target: torch.Tensor) -> list[float]:
    return [structural_similarity(p.permute(1, 2, 0).double().numpy(), t.permute(1, 2, 0).double().numpy(),
                                  gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                  data_range=1.0, channel_axis=-1)
            for p, t in zip(prediction, target)]


def test_ssim_matches_skimage_on_degraded_photographs(photos):
    generator = torch.Generator().manual_seed(0)
    target = random_crops(photos, 4, 48, generator)
    noisy = (target + 0.08 * torch.randn(target.shape, generator=generator)).clamp(0, 1)
    blurred = torch.nn.functional.avg_pool2d(target, 3, 1, 1, count_include_pad=False)
    for prediction in (noisy, blurred, target.flip(-1)):
        np.testing.assert_allclose(ssim(prediction, target).numpy(), _skimage_ssim(prediction, target), atol=1e-6)


def test_ssim_of_identical_images_is_one_and_rectangular_images_work():
    images = torch.rand(2, 3, 20, 33, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ssim(images, images), torch.ones(2, dtype=torch.float64))
    assert ssim(images, images.flip(0)).lt(0.5).all()


def test_ssim_rejects_small_or_mismatched_images():
    with pytest.raises(ValueError):
        ssim(torch.rand(1, 3, 10, 32), torch.rand(1, 3, 10, 32))
    with pytest.raises(ValueError):
        ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 17))


def test_psnr_of_a_constant_error():
    target = torch.full((1, 3, 8, 8), 0.5)
    assert float(psnr(target + 0.1, target)) == pytest.approx(20.0)
