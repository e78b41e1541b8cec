"""Pixel metrics on [0, 1] images: PSNR and SSIM.

SSIM follows Wang et al. (2004) with the common settings (also scikit-image's
``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=1)``): an 11-tap Gaussian window (sigma 1.5, normalised to sum 1), K1 = 0.01,
K2 = 0.03, data range 1. Local statistics are computed only where the window fits inside the
image ("valid" positions); the SSIM map is averaged over those positions and then over the
channels (each channel scored on its own, no colour conversion). Computed in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for [B, C, H, W] images in [0, 1] (peak 1.0; predictions clamped)."""
    mse = (prediction.clamp(0, 1).double() - target.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))


def _gaussian_window(device: torch.device) -> torch.Tensor:
    """The normalised 1-D Gaussian taps, float64 ``[SSIM_WINDOW]``."""
    x = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - (SSIM_WINDOW - 1) / 2
    taps = torch.exp(-(x ** 2) / (2 * SSIM_SIGMA ** 2))
    return taps / taps.sum()


def ssim(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM for [B, C, H, W] images in [0, 1] (predictions clamped); see the module
    docstring for the convention. Images must be at least 11 px on each side."""
    if prediction.shape != target.shape or prediction.ndim != 4:
        raise ValueError(f"expected two [B, C, H, W] batches of one shape, got "
                         f"{tuple(prediction.shape)} and {tuple(target.shape)}")
    if min(prediction.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} px, got {tuple(prediction.shape[-2:])}")
    channels = prediction.shape[1]
    taps = _gaussian_window(prediction.device)
    rows = taps.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    cols = taps.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, rows, groups=channels), cols, groups=channels)

    x, y = prediction.clamp(0, 1).double(), target.double()
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x ** 2
    var_y = blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(2).mean(2).mean(1)


def mean_color_baseline(images: torch.Tensor) -> torch.Tensor:
    """Each image replaced by its own mean colour: the trivial reconstruction PSNR is measured against."""
    return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
