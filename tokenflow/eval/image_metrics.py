"""Pixel metrics on [0, 1] images."""

from __future__ import annotations

import torch


def psnr(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for [B, C, H, W] images in [0, 1] (peak 1.0; predictions clamped)."""
    mse = (prediction.clamp(0, 1).double() - target.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-12))


def mean_color_baseline(images: torch.Tensor) -> torch.Tensor:
    """Each image replaced by its own mean colour: the trivial reconstruction PSNR is measured against."""
    return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
