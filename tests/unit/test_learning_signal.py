"""A short CPU training run of the tiny tokenizer on real photographs must clearly learn."""

import torch
import torch.nn.functional as F

from tokenflow.models.losses import TokenizerLoss
from tokenflow.models.tokenizer import TokenFlowTokenizer

from tests.conftest import random_crops

STEPS = 160


def _heldout_l2(model: TokenFlowTokenizer, images: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        recon = model(images).reconstruction
    model.train()
    return float(F.mse_loss(recon, images * 2 - 1))


def test_a_few_hundred_steps_lower_heldout_reconstruction_loss(tiny_config, photos):
    torch.manual_seed(0)
    train_photos, heldout_photos = photos[:-3], photos[-3:]
    heldout = random_crops(heldout_photos, 8, 64, torch.Generator().manual_seed(123))
    model = TokenFlowTokenizer(tiny_config)
    loss = TokenizerLoss(tiny_config)
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3, betas=(0.9, 0.95))
    before = _heldout_l2(model, heldout)
    g = torch.Generator().manual_seed(0)
    for step in range(STEPS):
        images = random_crops(train_photos, 4, 64, g)
        out = model(images, drop_scale=model.sample_drop_scale(g))
        terms = loss.generator_terms(images, out, step)
        opt.zero_grad()
        terms["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
        opt.step()
    after = _heldout_l2(model, heldout)
    assert after < 0.6 * before, (before, after)
    assert model.usage.usage() > 0.5
