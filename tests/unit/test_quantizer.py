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


def test_multiscale_indices_match_an_independent_residual_loop():
    q = _quantizer()
    g = torch.Generator().manual_seed(3)
    f = torch.randn(2, 40, 8, 8, generator=g)
    out = q(f)
    rest = f.clone()
    for s in q.scales:
        down = F.adaptive_avg_pool2d(rest, s).permute(0, 2, 3, 1).reshape(-1, 40)
        zs, zp = F.normalize(down[:, :32], dim=1), F.normalize(down[:, 32:], dim=1)
        idx = _brute_force(q, zs, zp)
        assert torch.equal(out.indices[s].reshape(-1), idx), f"scale {s}"
        codes = torch.cat([F.normalize(q.semantic_codebook, dim=1)[idx],
                           F.normalize(q.pixel_codebook, dim=1)[idx]], dim=1)
        codes = codes.view(2, s, s, 40).permute(0, 3, 1, 2)
        if s != 8:
            codes = F.interpolate(codes, size=(8, 8), mode="bicubic", align_corners=False)
        rest = rest - codes.detach()


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
