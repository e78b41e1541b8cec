import torch

from tokenflow.config import load_config
from tokenflow.models.discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from tokenflow.models.losses import TokenizerLoss, semantic_distillation_loss
from tokenflow.models.tokenizer import TokenFlowTokenizer

from tests.conftest import MODEL_CONFIGS


def test_hinge_losses_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # real: relu(1 - r) = [0, 0.5, 2] -> 0.8333; fake: relu(1 + f) = [0, 1, 2] -> 1.0
    assert torch.isclose(hinge_d_loss(real, fake), torch.tensor(0.5 * (2.5 / 3 + 1.0)))
    assert torch.isclose(hinge_g_loss(fake), torch.tensor(1.0 / 3))


def test_semantic_loss_is_one_minus_cosine():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    b = torch.tensor([[[2.0, 0.0], [1.0, 0.0]]])
    assert torch.isclose(semantic_distillation_loss(a, b), torch.tensor(0.5))


def test_adversarial_term_starts_at_the_configured_step(tiny_config):
    model = TokenFlowTokenizer(tiny_config)
    disc = PatchDiscriminator(tiny_config.discriminator)
    loss = TokenizerLoss(tiny_config)
    images = torch.rand(2, 3, 64, 64)
    out = model(images)
    start = tiny_config.discriminator.start_step
    assert "gan" not in loss.generator_terms(images, out, start - 1, disc)
    terms = loss.generator_terms(images, out, start, disc)
    w = tiny_config.loss_weights
    expected = (w.l2 * terms["l2"] + w.semantic * terms["semantic"]
                + w.vq * (terms["vq"] + terms["commit"]) + w.gan * terms["gan"])
    assert torch.isclose(terms["total"], expected)


def test_discriminator_gives_patch_logits(tiny_config):
    disc = PatchDiscriminator(tiny_config.discriminator)
    logits = disc(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert logits.ndim == 4 and logits.shape[1] == 1 and logits.shape[-1] > 1
    cfg_b = load_config(MODEL_CONFIGS / "tokenflow-b.yaml",
                        ["tokenizer.semantic_encoder.pretrained=null"]).tokenizer
    assert PatchDiscriminator(cfg_b.discriminator)(torch.zeros(1, 3, 224, 224)).shape == (1, 1, 26, 26)
