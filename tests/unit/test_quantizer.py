import pytest
import torch
import torch.nn.functional as F

from tokenflow.config import QuantizerConfig, load_config
from tokenflow.models.quantizer import SharedMappingQuantizer

from tests.conftest import MODEL_CONFIGS


def _quantizer(scales=(1, 2, 3, 4, 6, 8), k=256, w=1.0) -> SharedMappingQuantizer:
    torch.manual_seed(0)
    q = SharedMappingQuantizer(QuantizerConfig(codebook_size=k, scales=scales, pixel_distance_weight=w))
    with torch.no_grad():  # spread the codes so nearest-code decisions are not near-ties
        q.semantic_codebook.normal_()
        q.pixel_codebook.normal_()
    return q


def _brute_force(q: SharedMappingQuantizer, z_sem: torch.Tensor, z_pix: torch.Tensor) -> torch.Tensor:
    e_sem = F.normalize(q.semantic_codebook.double(), dim=1)
    e_pix = F.normalize(q.pixel_codebook.double(), dim=1)
    d_sem = ((z_sem.double()[:, None, :] - e_sem[None]) ** 2).sum(-1)
    d_pix = ((z_pix.double()[:, None, :] - e_pix[None]) ** 2).sum(-1)
    return (d_sem + q.cfg.pixel_distance_weight * d_pix).argmin(dim=1)


@pytest.mark.parametrize("w", [1.0, 0.25, 4.0])
def test_nearest_equals_brute_force_weighted_argmin(w):
    q = _quantizer(w=w)
    g = torch.Generator().manual_seed(1)
    z_sem = F.normalize(torch.randn(5000, 32, generator=g), dim=1)
    z_pix = F.normalize(torch.randn(5000, 8, generator=g), dim=1)
    assert torch.equal(q.nearest(z_sem, z_pix), _brute_force(q, z_sem, z_pix))


def test_pixel_weight_changes_decisions():
    g = torch.Generator().manual_seed(2)
    z_sem = F.normalize(torch.randn(2000, 32, generator=g), dim=1)
    z_pix = F.normalize(torch.randn(2000, 8, generator=g), dim=1)
    sem_only = _quantizer(w=0.0).nearest(z_sem, z_pix)
    shared = _quantizer(w=1.0).nearest(z_sem, z_pix)
    assert (sem_only != shared).float().mean() > 0.1


def _reference_pass(q: SharedMappingQuantizer, h: torch.Tensor):
    """The reference formulation, from its equations: the residual starts as the RAW latent h; at
    each scale s it is area-downsampled, each half L2-normalised for the lookup, the index is the
    shared-mapping argmin of d_sem + w d_pix, the chosen unit-norm codes are bicubic-upsampled to
    the full grid, summed into the features and subtracted from the raw residual."""
    grid = q.scales[-1]
    e_sem = F.normalize(q.semantic_codebook.detach(), dim=1)
    e_pix = F.normalize(q.pixel_codebook.detach(), dim=1)
    residual, features = h.clone(), torch.zeros_like(h)
    indices, residual_norms = {}, []
    for s in q.scales:
        down = F.adaptive_avg_pool2d(residual, s).permute(0, 2, 3, 1).reshape(-1, 40)
        idx = _brute_force(q, F.normalize(down[:, :32], dim=1), F.normalize(down[:, 32:], dim=1))
        codes = torch.cat([e_sem[idx], e_pix[idx]], dim=1).view(h.shape[0], s, s, 40).permute(0, 3, 1, 2)
        if s != grid:
            codes = F.interpolate(codes, size=(grid, grid), mode="bicubic", align_corners=False)
        features = features + codes
        residual = residual - codes
        indices[s] = idx.view(h.shape[0], s * s)
        residual_norms.append([residual[:, :32].norm() / h[:, :32].norm(), residual[:, 32:].norm() / h[:, 32:].norm()])
    return indices, features, torch.tensor(residual_norms)


@pytest.mark.parametrize("magnitude", [0.3, 4.0])
def test_forward_equals_the_reference_formulation_on_a_raw_latent(magnitude):
    q = _quantizer()
    g = torch.Generator().manual_seed(3)
    h = magnitude * torch.randn(2, 40, 8, 8, generator=g)
    with torch.no_grad():
        out = q(h)
    indices, features, residual_norms = _reference_pass(q, h)
    for s in q.scales:
        assert torch.equal(out.indices[s], indices[s]), f"scale {s}"
    torch.testing.assert_close(out.features, features, rtol=1e-5, atol=1e-5)
    metrics = out.profile.metrics()
    measured = torch.tensor([[metrics[f"residual/{half}/scale_{i}_{s}"] for half in ("semantic", "pixel")]
                             for i, s in enumerate(q.scales)])
    torch.testing.assert_close(measured, residual_norms, rtol=1e-4, atol=1e-5)
    rms = [h[:, :32].pow(2).sum(1).mean().sqrt(), h[:, 32:].pow(2).sum(1).mean().sqrt()]
    assert metrics["latent_norm/semantic"] == pytest.approx(float(rms[0]), rel=1e-5)
    assert metrics["latent_norm/pixel"] == pytest.approx(float(rms[1]), rel=1e-5)


def test_the_latent_magnitude_decides_how_much_the_scales_take():
    """The codes are unit-norm whatever the latent's norm and the quantizer never rescales its
    input: the first lookup ignores the magnitude, what is left after it does not."""
    q = _quantizer()
    h = torch.randn(2, 40, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        small, large = q(0.01 * h), q(100 * h)
    assert torch.equal(small.indices[1], large.indices[1])
    first_small = small.profile.metrics()["residual/pixel/scale_0_1"]
    first_large = large.profile.metrics()["residual/pixel/scale_0_1"]
    assert first_small > 10 and 0.9 < first_large < 1.01  # a unit code swamps a tiny latent


@pytest.mark.parametrize("path", sorted(MODEL_CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_token_count_is_sum_of_squared_scales_for_every_config(path):
    cfg = load_config(path).tokenizer
    scales = cfg.quantizer.scales
    q = SharedMappingQuantizer(cfg.quantizer)
    with torch.no_grad():
        out = q(torch.randn(1, cfg.quantizer.feature_dim, cfg.grid_size, cfg.grid_size))
    tokens = torch.cat([out.indices[s] for s in scales], dim=1)
    assert tokens.shape == (1, sum(s * s for s in scales)) == (1, cfg.quantizer.num_tokens)
    assert int(tokens.max()) < cfg.quantizer.codebook_size


def test_tokens_to_features_reproduces_forward_features():
    q = _quantizer()
    f = torch.randn(3, 40, 8, 8)
    with torch.no_grad():
        out = q(f)
        tokens = torch.cat([out.indices[s] for s in q.scales], dim=1)
        assert torch.equal(q.tokens_to_features(tokens), out.features)


def test_dropped_scale_is_skipped_and_first_scale_never_dropped():
    q = _quantizer()
    out = q(torch.randn(1, 40, 8, 8), drop_scale=2)
    assert 3 not in out.indices and set(out.indices) == {1, 2, 4, 6, 8}
    assert out.profile.scales == ((0, 1), (1, 2), (3, 4), (4, 6), (5, 8))
    assert "residual/pixel/scale_3_4" in out.profile.metrics() and "residual/pixel/scale_2_3" not in out.profile.metrics()
    with pytest.raises(ValueError, match="cannot add profiles"):
        out.profile.add(q(torch.randn(1, 40, 8, 8)).profile)
    with pytest.raises(ValueError, match="first scale"):
        q(torch.randn(1, 40, 8, 8), drop_scale=0)


def test_gradients_reach_both_codebooks_and_the_input():
    q = _quantizer()
    f = torch.randn(2, 40, 8, 8, requires_grad=True)
    out = q(f)
    (out.features.square().mean() + out.vq_loss + out.commit_loss).backward()
    assert q.semantic_codebook.grad.abs().sum() > 0
    assert q.pixel_codebook.grad.abs().sum() > 0
    assert f.grad.abs().sum() > 0


def test_wrong_token_count_is_rejected():
    q = _quantizer()
    with pytest.raises(ValueError, match="expected 130 tokens"):
        q.tokens_to_features(torch.zeros(1, 129, dtype=torch.long))
