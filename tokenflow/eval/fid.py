"""Fréchet Inception Distance: float64 Fréchet distance and an Inception-v3 pool-feature extractor.

Features are the 2048-d global-average-pooled activations after ``Mixed_7c`` of Inception-v3,
built with torchvision's ``inception_v3`` layout (``weights=None``: nothing is downloaded) and
loaded from a configured state-dict file. Two weight sets are supported:

* ``architecture="fid"`` (default): the standard FID network, the TensorFlow 2015-12-05 Inception
  graph ported to PyTorch (the ``pt_inception-2015-12-05-*.pth`` state dict used by pytorch-fid
  and most published FID/rFID numbers). It differs from torchvision's blocks only in pooling: the
  3x3 average pools of the A, C and first E blocks exclude padding from the average, and the last
  E block pools its side branch with a max instead of an average.
* ``architecture="torchvision"``: torchvision's ImageNet Inception-v3 weights (not comparable
  with published FIDs).

Classifier (``fc.*``) and auxiliary-head (``AuxLogits.*``) entries of the file are ignored; every
other parameter and buffer must be present.

Input convention (identical for both): images ``[B, 3, H, W]`` in [0, 1] are resized to 299x299
with bilinear interpolation (``align_corners=False``, no antialiasing), then mapped to [-1, 1] by
``2x - 1`` (what pytorch-fid feeds the FID network, and what torchvision's ``transform_input``
turns ImageNet-normalised inputs into for its weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import inception as tv_inception

from tokenflow.models.perceptual import load_state_dict_file

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
InceptionArchitecture = Literal["fid", "torchvision"]
_IGNORED_PREFIXES = ("fc.", "AuxLogits.")


def _avg_pool_exclude_pad(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _TFPoolMixin:
    """Recomputes an Inception block's last (pooling) branch with the TF graph's pooling.

    torchvision's blocks return their branches as a list with the pooled branch last; only that
    entry is replaced (its 1x1 conv runs twice, a negligible cost for an evaluation network).
    """

    tf_pool: Callable[[torch.Tensor], torch.Tensor]
    branch_pool: nn.Module

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = super()._forward(x)  # type: ignore[misc]
        outputs[-1] = self.branch_pool(self.tf_pool(x))
        return outputs


class _FIDInceptionA(_TFPoolMixin, tv_inception.InceptionA):
    tf_pool = staticmethod(_avg_pool_exclude_pad)


class _FIDInceptionC(_TFPoolMixin, tv_inception.InceptionC):
    tf_pool = staticmethod(_avg_pool_exclude_pad)


class _FIDInceptionE1(_TFPoolMixin, tv_inception.InceptionE):
    tf_pool = staticmethod(_avg_pool_exclude_pad)


class _FIDInceptionE2(_TFPoolMixin, tv_inception.InceptionE):
    tf_pool = staticmethod(_max_pool)


def _use_tf_pooling(net: tv_inception.Inception3) -> None:
    """Swap the pooling-affected blocks for their FID variants (same parameters and names)."""
    net.Mixed_5b = _FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = _FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = _FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = _FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = _FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = _FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = _FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = _FIDInceptionE1(1280)
    net.Mixed_7c = _FIDInceptionE2(2048)


class InceptionFeatureExtractor(nn.Module):
    """Images ``[B, 3, H, W]`` in [0, 1] -> 2048-d Inception-v3 pool features (float32).

    ``weights_path``: a torch or safetensors state dict in torchvision's Inception-v3 key layout
    (a missing file raises ``FileNotFoundError`` naming it). See the module docstring for the
    architectures and the resize convention.
    """

    def __init__(self, weights_path: str | Path, architecture: InceptionArchitecture = "fid"):
        super().__init__()
        state = load_state_dict_file(weights_path, f"Inception-v3 ({architecture}) FID weights")
        net = tv_inception.inception_v3(weights=None, aux_logits=False, init_weights=False)
        if architecture == "fid":
            _use_tf_pooling(net)
        elif architecture != "torchvision":
            raise ValueError(f"unknown Inception architecture {architecture!r}; expected 'fid' or 'torchvision'")
        net.fc = nn.Identity()
        net.load_state_dict({k: v for k, v in state.items() if not k.startswith(_IGNORED_PREFIXES)})
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "InceptionFeatureExtractor":
        """Always in eval mode (batch-norm statistics and dropout are frozen)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W] in [0, 1], got {tuple(images.shape)}")
        x = F.interpolate(images.float(), size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear",
                          align_corners=False)
        return self.net(2.0 * x - 1.0)


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of ``[N, D]`` features, N >= 2."""
    feats = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features,
                       dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"expected [N >= 2, D] features, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """``||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2))`` between two Gaussians, in float64.

    ``sqrt(S1 S2)`` is ``scipy.linalg.sqrtm``; when it is not finite (singular product, e.g. fewer
    samples than dimensions) both covariances get ``eps * I`` added and it is recomputed. A complex
    result is reduced to its real part when the imaginary parts on its diagonal are below 1e-3
    (numerical noise); larger ones raise ``ValueError``.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: means {mu1.shape}, {mu2.shape}; "
                         f"covariances {sigma1.shape}, {sigma2.shape}")
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        worst = np.abs(np.diagonal(covmean).imag).max()
        if worst > 1e-3:
            raise ValueError(f"matrix square root has an imaginary component of {worst:.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features1: np.ndarray | torch.Tensor, features2: np.ndarray | torch.Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two ``[N, D]`` feature sets."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
