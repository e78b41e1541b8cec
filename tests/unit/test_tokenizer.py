import pytest
import torch

from tokenflow.config import load_config
from tokenflow.models.losses import TokenizerLoss
from tokenflow.models.tokenizer import TokenFlowTokenizer

from tests.conftest import MODEL_CONFIGS, random_crops


@pytest.fixture(scope="module")
def model(tiny_config):
    torch.manual_seed(0)
    return TokenFlowTokenizer(tiny_config)


@pytest.fixture(scope="module")
def images(photos):
    return random_crops(photos, 4, 64, torch.Generator().manual_seed(0))


def test_encode_gives_scale_major_tokens(model, images, tiny_config):
    tokens = model.encode(images)
    assert tokens.shape == (4, tiny_config.quantizer.num_tokens) == (4, 130)
    assert tokens.dtype == torch.long
    assert 0 <= int(tokens.min()) and int(tokens.max()) < tiny_config.quantizer.codebook_size
    assert int(tokens[:, 0].max()) < tiny_config.quantizer.codebook_size  # the 1x1 scale comes first


def test_decode_of_encode_equals_the_quantized_path(model, images):
    model.eval()
    with torch.no_grad():
        out = model(images)
    expected = ((out.reconstruction + 1) / 2).clamp(0, 1)
    assert torch.equal(model.decode_indices(model.encode(images)), expected)
    model.train()


def test_indices_to_features_is_the_accumulated_code_grid(model, images, tiny_config):
    tokens = model.encode(images)
    feats = model.indices_to_features(tokens)
    g = tiny_config.grid_size
    assert feats.shape == (4, g * g, 40)
    with torch.no_grad():
        q = model.quantizer(model.latent(images))
    assert torch.equal(feats, q.features.flatten(2).transpose(1, 2))
    # Each scale contributes one unit vector per half, so per-position norms reflect the sum.
    assert feats[..., :32].norm(dim=-1).max() > 1.0


def test_the_latent_enters_the_quantizer_raw(model, images, tiny_config):
    """As in the reference: the encoders' outputs are concatenated as they are (no per-half
    normalisation), and the quantizer's profile measures that raw latent."""
    from tokenflow.models.quantizer import resize

    with torch.no_grad():
        latent = model.latent(images)
        sem = model.semantic_proj(model.semantic_encoder.tokens(images)).transpose(1, 2).reshape(4, 32, 8, 8)
        pix = model.quant_conv(model.pixel_encoder(resize(images * 2 - 1, tiny_config.pixel_size, "bicubic")))
        q = model.quantize(images)
    assert torch.equal(latent, torch.cat([sem, pix], dim=1))
    assert not torch.allclose(latent[:, 32:].norm(dim=1), torch.ones(4, 8, 8), atol=1e-2)
    expected = latent[:, 32:].pow(2).sum(1).mean().sqrt()
    assert q.profile.metrics()["latent_norm/pixel"] == pytest.approx(float(expected), rel=1e-5)


def test_gradients_reach_both_encoders_and_codebooks_but_not_the_teacher(tiny_config, images):
    torch.manual_seed(0)
    model = TokenFlowTokenizer(tiny_config)
    loss = TokenizerLoss(tiny_config)
    out = model(images)
    loss.generator_terms(images, out, step=0)["total"].backward()

    def grad_norm(module):
        return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)

    assert grad_norm(model.semantic_encoder) > 0
    assert grad_norm(model.pixel_encoder) > 0
    assert float(model.quantizer.semantic_codebook.grad.abs().sum()) > 0
    assert float(model.quantizer.pixel_codebook.grad.abs().sum()) > 0
    assert grad_norm(model.semantic_decoder) > 0 and grad_norm(model.pixel_decoder) > 0
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    teacher_ids = {id(p) for p in model.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in model.trainable_parameters()}


def test_teacher_stays_in_eval_mode(model):
    model.train()
    assert model.training and not model.teacher.training


def test_scale_drop_sampling(tiny_config):
    model = TokenFlowTokenizer(tiny_config, with_teacher=False)
    g = torch.Generator().manual_seed(0)
    draws = [model.sample_drop_scale(g) for _ in range(4000)]
    dropped = [d for d in draws if d is not None]
    assert 0.08 < len(dropped) / len(draws) < 0.12  # p = 0.1
    assert set(dropped) == set(range(1, len(tiny_config.quantizer.scales)))


def test_wrong_image_shape_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"expected images \[B, 3, 64, 64\]"):
        model.encode(torch.rand(1, 3, 32, 32))


def test_codebook_usage_window(model, images):
    from tokenflow.models.codebook_usage import CodebookUsage

    usage = CodebookUsage(codebook_size=4, window=2)
    usage.update(torch.tensor([0, 0, 0, 0]))
    assert usage.usage() == 0.25 and usage.perplexity() == pytest.approx(1.0)
    usage.update(torch.tensor([1, 2, 3, 1]))
    assert usage.usage() == 1.0
    usage.update(torch.tensor([0, 1, 2, 3]))  # the first batch leaves the window
    assert usage.counts.tolist() == [1, 3, 2, 2]
    usage.update(torch.tensor([0, 1, 2, 3]))
    assert usage.perplexity() == pytest.approx(4.0)


def test_inference_only_model_refuses_training_loss(tiny_config, images):
    model = TokenFlowTokenizer(tiny_config, with_teacher=False)
    with pytest.raises(ValueError, match="frozen teacher"):
        TokenizerLoss(tiny_config).generator_terms(images, model(images), step=0)


def test_tokenflow_b_architecture_builds_and_encodes_561_tokens():
    cfg = load_config(MODEL_CONFIGS / "tokenflow-b.yaml",
                      ["tokenizer.semantic_encoder.pretrained=null"]).tokenizer
    model = TokenFlowTokenizer(cfg, with_teacher=False).eval()
    assert model.semantic_encoder.token_dim == 768 and model.semantic_encoder.target_dim == 512
    tokens = model.encode(torch.rand(1, 3, 224, 224))
    assert tokens.shape == (1, 561)
    assert model.decode_indices(tokens).shape == (1, 3, 224, 224)


def test_transformers_siglip_tower_builds_from_config_and_encodes(tiny_config):
    tower = {"backend": "transformers", "arch": "siglip_vision_model", "patch_size": 8,
             "feature_layer": -2, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
             "overrides": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "intermediate_size": 128}}
    cfg = tiny_config.model_copy(update={"semantic_encoder": type(tiny_config.semantic_encoder)(**tower)})
    model = TokenFlowTokenizer(cfg).eval()
    assert model.semantic_encoder.token_dim == model.semantic_encoder.target_dim == 64
    images = torch.rand(2, 3, 64, 64)
    assert model.encode(images).shape == (2, 130)
    assert model(images).semantic_target.shape == (2, 64, 64)


def test_enhanced_decoder_is_wider_and_deeper():
    base = load_config(MODEL_CONFIGS / "tokenflow-b.yaml", ["tokenizer.semantic_encoder.pretrained=null"])
    enhanced = load_config(MODEL_CONFIGS / "tokenflow-b-enhanced-decoder.yaml",
                           ["tokenizer.semantic_encoder.pretrained=null"])
    from tokenflow.models.pixel_codec import PixelDecoder

    def count(cfg):
        return sum(p.numel() for p in PixelDecoder(cfg.tokenizer.pixel_codec).parameters())

    assert count(enhanced) > 3 * count(base)
    out = PixelDecoder(enhanced.tokenizer.pixel_codec)(torch.zeros(1, 256, 2, 2))
    assert out.shape == (1, 3, 32, 32)
