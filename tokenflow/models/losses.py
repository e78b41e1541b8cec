"""Tokenizer training objectives: pixel (L2, perceptual, adversarial), semantic, and VQ terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenflow.config import TokenizerConfig
from tokenflow.models.discriminator import hinge_d_loss, hinge_g_loss
from tokenflow.models.perceptual import PerceptualLoss
from tokenflow.models.tokenizer import TokenizerOutput


def semantic_distillation_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cosine(prediction, target)."""
    return (1.0 - F.cosine_similarity(prediction, target, dim=-1)).mean()


class TokenizerLoss(nn.Module):
    """Weighted sum of the generator-side terms, and the discriminator's hinge loss."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.weights = cfg.loss_weights
        self.gan_start = cfg.discriminator.start_step
        self.perceptual = PerceptualLoss(cfg.perceptual) if cfg.perceptual.enabled else None

    def gan_active(self, step: int) -> bool:
        return self.weights.gan > 0 and step >= self.gan_start

    def pixel_terms(
        self,
        images: torch.Tensor,
        reconstruction: torch.Tensor,
        step: int,
        discriminator: nn.Module | None = None,
    ) -> dict[str, torch.Tensor]:
        """The pixel decoder's terms (L2, perceptual, adversarial from ``gan_start``); ``total``
        is their weighted sum. ``images`` in [0, 1], ``reconstruction`` in [-1, 1]."""
        target = images * 2.0 - 1.0
        w = self.weights
        terms = {"l2": F.mse_loss(reconstruction, target)}
        total = w.l2 * terms["l2"]
        if self.perceptual is not None and w.perceptual > 0:
            terms["perceptual"] = self.perceptual(reconstruction, target)
            total = total + w.perceptual * terms["perceptual"]
        if discriminator is not None and self.gan_active(step):
            terms["gan"] = hinge_g_loss(discriminator(reconstruction))
            total = total + w.gan * terms["gan"]
        terms["total"] = total
        return terms

    def generator_terms(
        self,
        images: torch.Tensor,
        out: TokenizerOutput,
        step: int,
        discriminator: nn.Module | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms for the tokenizer: the pixel terms plus semantic distillation and the VQ
        terms; ``total`` is their weighted sum. ``images`` in [0, 1]."""
        if out.semantic_target is None:
            raise ValueError("training needs the frozen teacher (build the tokenizer with_teacher=True)")
        w = self.weights
        terms = self.pixel_terms(images, out.reconstruction, step, discriminator)
        terms["semantic"] = semantic_distillation_loss(out.semantic_prediction, out.semantic_target)
        terms["vq"], terms["commit"] = out.vq_loss, out.commit_loss
        terms["total"] = terms["total"] + w.semantic * terms["semantic"] + w.vq * (terms["vq"] + terms["commit"])
        return terms

    def discriminator_loss(
        self, discriminator: nn.Module, images: torch.Tensor, reconstruction: torch.Tensor
    ) -> torch.Tensor:
        """Hinge loss on real images vs detached reconstructions (images in [0, 1])."""
        real = discriminator(images * 2.0 - 1.0)
        fake = discriminator(reconstruction.detach())
        return hinge_d_loss(real, fake)
