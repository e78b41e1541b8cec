"""Fréchet distance against closed forms, and the Inception feature extractor from a weights file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models import inception_v3

from tokenflow.eval.fid import (FEATURE_DIM, InceptionFeatureExtractor, feature_statistics,
                                fid_from_features, frechet_distance)


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(m)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def test_diagonal_gaussians_match_the_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_full_covariances_match_the_symmetric_form():
    """tr sqrt(S1 S2) == tr sqrt(S1^1/2 S2 S1^1/2), computed here by eigendecomposition."""
    rng = np.random.default_rng(1)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    root1 = _psd_sqrt(s1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(_psd_sqrt(root1 @ s2 @ root1))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_sampled_gaussians_approach_the_population_distance():
    rng = np.random.default_rng(2)
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([0.5, 2.0, 1.5])
    a = rng.normal(mu1, np.sqrt(s1), size=(200_000, 3))
    b = rng.normal(mu2, np.sqrt(s2), size=(200_000, 3))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert fid_from_features(a, b) == pytest.approx(expected, abs=0.02)


def test_statistics_are_float64_mean_and_unbiased_covariance():
    feats = torch.randn(50, 8, generator=torch.Generator().manual_seed(3))
    mu, sigma = feature_statistics(feats)
    assert mu.dtype == sigma.dtype == np.float64
    centred = feats.double().numpy() - feats.double().numpy().mean(0)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-12)
    with pytest.raises(ValueError):
        feature_statistics(feats[:1])


def test_fewer_samples_than_dimensions_still_give_a_finite_distance():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(10, 64))
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-3)
    assert np.isfinite(fid_from_features(a, b)) and fid_from_features(a, b) > 0


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A randomly initialised torchvision Inception-v3 state dict (with fc and aux head)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(inception_v3(weights=None, init_weights=False).state_dict(), path)
    return path


def test_extractor_loads_weights_and_gives_pool_features(inception_weights):
    extractor = InceptionFeatureExtractor(inception_weights)
    features = extractor(torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(5)))
    assert features.shape == (1, FEATURE_DIM) and features.dtype == torch.float32
    assert torch.isfinite(features).all()
    extractor.train()
    assert not extractor.net.training


@pytest.mark.parametrize("architecture", ["fid", "torchvision"])
def test_pooling_branches_follow_the_architecture(inception_weights, architecture):
    """The FID network pools the A/C/first-E side branches without counting padding and the
    last E block with a max; torchvision's averages count the zero padding."""
    net = InceptionFeatureExtractor(inception_weights, architecture).net
    generator = torch.Generator().manual_seed(6)
    for block, channels, fid_pool in ((net.Mixed_5b, 192, "avg"), (net.Mixed_6b, 768, "avg"),
                                      (net.Mixed_7b, 1280, "avg"), (net.Mixed_7c, 2048, "max")):
        x = torch.randn(1, channels, 5, 5, generator=generator)
        if architecture == "torchvision":
            pooled = F.avg_pool2d(x, 3, 1, 1)
        elif fid_pool == "avg":
            pooled = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
        else:
            pooled = F.max_pool2d(x, 3, 1, 1)
        with torch.no_grad():
            expected = block.branch_pool(pooled)
            out = block(x)
        torch.testing.assert_close(out[:, -expected.shape[1]:], expected)


def test_missing_weights_name_the_file(tmp_path):
    missing = tmp_path / "pt_inception-2015-12-05.pth"
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05.pth"):
        InceptionFeatureExtractor(missing)
